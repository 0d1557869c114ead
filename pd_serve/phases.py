"""Where each request's time to first byte goes, and where requests are right now.

The ingress stamps when it received, parsed and rendered a request; decode stamps when it
started it, reserved a prefill replica, held the KV hand-off and saw the engine's first output
(``protocol.DecodeTimeline``, returned inside ``protocol.Head``); the ingress stamps the first
byte it hands to the HTTP server. ``phases`` turns those stamps into consecutive phases that
add up to the ingress's time to first byte:

==================== ===========================================================================
``parse``            body read and validated with vLLM's request model
``render``           prompt rendered to token ids (tokenizer, chat template) and hashed
``to_decode``        Ray Serve routing to a decode replica, queueing there, and the hop
``prefill_select``   decode waits for a prefill replica (remote prefill only)
``prefill``          the remote prefill, its hop and its answer (remote prefill only)
``decode_first_token`` decode engine: KV pull (or local prefill) and the first step
``to_client``        the first output's way from the decode engine to the ingress's response
==================== ===========================================================================

Stamps taken in different processes are ``time.time()``; on one node they share a clock, across
nodes they differ by the clock offset (NTP keeps it in the milliseconds).

``InFlight`` keeps ``pd_serve_requests_in_flight{stage}`` exact for one request as it moves
through stages. ``Tracer`` exports the same phases as OpenTelemetry spans when an OTLP endpoint
is configured, and is never imported otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

from pd_serve.protocol import DecodeTimeline

logger = logging.getLogger(__name__)

PHASES = ("parse", "render", "to_decode", "prefill_select", "prefill", "decode_first_token", "to_client")


def phases(received: float, parsed: float, rendered: float, t: DecodeTimeline,
           first_byte: float) -> list[tuple[str, float, float]]:
    """(phase, start, end) for one request, consecutive from ``received`` to ``first_byte``.

    Remote-only phases are left out when decode prefilled locally. Cross-process stamps that
    disagree by a clock step are clamped so that no phase is negative and the chain still
    ends at ``first_byte``."""
    marks: list[tuple[str, float]] = [("parse", parsed), ("render", rendered), ("to_decode", t.entered)]
    if t.prefill_chosen:
        marks.append(("prefill_select", t.prefill_chosen))
        marks.append(("prefill", t.prefill_done or t.prefill_chosen))
    marks.append(("decode_first_token", t.first_token or t.entered))
    marks.append(("to_client", first_byte))
    out: list[tuple[str, float, float]] = []
    start = received
    for name, end in marks:
        end = min(max(end, start), first_byte)
        out.append((name, start, end))
        start = end
    return out


class InFlight:
    """One request's stage in ``pd_serve_requests_in_flight``: ``move`` to the next stage,
    ``close`` when it leaves (idempotent). Every ``inc`` is matched by exactly one ``dec``."""

    __slots__ = ("_gauge", "_stage")

    def __init__(self, gauge: Any, stage: str) -> None:
        self._gauge = gauge
        self._stage: str | None = stage
        gauge.labels(stage).inc()

    def move(self, stage: str) -> None:
        if self._stage is not None:
            self._gauge.labels(self._stage).dec()
        self._stage = stage
        self._gauge.labels(stage).inc()

    def close(self) -> None:
        if self._stage is not None:
            self._gauge.labels(self._stage).dec()
            self._stage = None


class Tracer:
    """Exports each request as a span ``pd_serve.request`` with one child span per phase, and
    ``stream`` from the first to the last byte, over OTLP/HTTP (protobuf).

    Spans are built after the fact from the stamps, in the ingress only, so no context has to
    cross Ray. A ``BatchSpanProcessor`` exports them off the request path."""

    def __init__(self, endpoint: str | None = None, service_name: str = "pd_serve",
                 exporter: Any = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        else:  # tests hand in an in-memory exporter and want spans at once
            self._provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("pd_serve")

    def request(self, request_id: str, api: str, chain: list[tuple[str, float, float]],
                end: float, attributes: dict[str, Any] | None = None) -> None:
        from opentelemetry import trace

        ns = (lambda t: int(t * 1e9))
        start = chain[0][1] if chain else end
        root = self._tracer.start_span("pd_serve.request", start_time=ns(start), attributes={
            "pd_serve.request_id": request_id, "pd_serve.api": api, **(attributes or {})})
        ctx = trace.set_span_in_context(root)
        for name, t0, t1 in chain:
            self._tracer.start_span(name, context=ctx, start_time=ns(t0)).end(end_time=ns(t1))
        if chain:
            self._tracer.start_span("stream", context=ctx, start_time=ns(chain[-1][2])).end(end_time=ns(end))
        root.end(end_time=ns(end))

    def shutdown(self) -> None:
        self._provider.shutdown()
