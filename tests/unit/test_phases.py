"""Request phases: consecutive, adding up to the time to first byte; the in-flight gauge; spans."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge

from pd_serve.phases import PHASES, InFlight, Tracer, phases
from pd_serve.protocol import Accepted, DecodeTimeline, Head, JSONReply, answer_items


def _remote() -> DecodeTimeline:
    return DecodeTimeline(entered=10.010, prefill_chosen=10.012, prefill_done=10.060,
                          first_token=10.075, where="remote")


def test_remote_phases_are_consecutive_and_add_up_to_the_first_byte() -> None:
    chain = phases(10.000, 10.001, 10.003, _remote(), 10.080)
    assert [p for p, _, _ in chain] == list(PHASES)
    assert chain[0][1] == 10.000 and chain[-1][2] == 10.080
    for (_, _, end), (_, start, _) in zip(chain, chain[1:]):
        assert end == start
    d = {p: round(b - a, 6) for p, a, b in chain}
    assert d == {"parse": 0.001, "render": 0.002, "to_decode": 0.007, "prefill_select": 0.002,
                 "prefill": 0.048, "decode_first_token": 0.015, "to_client": 0.005}


def test_local_prefill_has_no_remote_phases() -> None:
    t = DecodeTimeline(entered=1.01, first_token=1.05)
    chain = phases(1.0, 1.001, 1.002, t, 1.06)
    assert [p for p, _, _ in chain] == ["parse", "render", "to_decode", "decode_first_token", "to_client"]
    assert sum(b - a for _, a, b in chain) == pytest.approx(0.06)


def test_clock_disagreement_never_makes_a_phase_negative() -> None:
    # decode's clock a little behind the ingress's: entered before rendered
    t = DecodeTimeline(entered=0.9, first_token=1.2)
    chain = phases(1.0, 1.01, 1.02, t, 1.1)
    assert all(b >= a for _, a, b in chain)
    assert chain[-1][2] == 1.1 and sum(b - a for _, a, b in chain) == pytest.approx(0.1)


def test_in_flight_counts_each_request_in_exactly_one_stage() -> None:
    g = Gauge("t_in_flight", "t", ["stage"], registry=CollectorRegistry())
    val = (lambda s: g.labels(s)._value.get())
    a, b = InFlight(g, "ingress"), InFlight(g, "ingress")
    a.move("to_decode")
    assert (val("ingress"), val("to_decode")) == (1, 1)
    a.move("streaming")
    a.close()
    a.close()  # idempotent
    b.close()
    assert all(val(s) == 0 for s in ("ingress", "to_decode", "streaming"))


def test_answer_items_strips_the_envelopes() -> None:
    head = Head(DecodeTimeline(entered=1.0), "data: 1\n\n")
    assert answer_items([Accepted(1.0), head, "data: 2\n\n"]) == ["data: 1\n\n", "data: 2\n\n"]
    reply = JSONReply(200, b"{}")
    assert answer_items([Accepted(1.0), Head(DecodeTimeline(entered=1.0), reply)]) == [reply]


def test_tracer_exports_one_request_span_with_a_child_per_phase() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exp = InMemorySpanExporter()
    tracer = Tracer(exporter=exp)
    chain = phases(10.000, 10.001, 10.003, _remote(), 10.080)
    tracer.request("req-1", "completion", chain, end=10.5, attributes={"pd_serve.prefill": "remote"})
    spans = {s.name: s for s in exp.get_finished_spans()}
    assert set(spans) == {"pd_serve.request", "stream", *PHASES}
    root = spans["pd_serve.request"]
    assert root.attributes["pd_serve.request_id"] == "req-1"
    assert (root.start_time, root.end_time) == (10_000_000_000, 10_500_000_000)
    for name in (*PHASES, "stream"):
        assert spans[name].parent.span_id == root.context.span_id
        assert spans[name].context.trace_id == root.context.trace_id
    assert spans["prefill"].end_time - spans["prefill"].start_time == 48_000_000
    assert spans["stream"].start_time == spans["to_client"].end_time
    tracer.shutdown()
