"""Typed envelopes that cross the ingress <-> decode <-> prefill hops.

The OpenAI request/response models themselves are vLLM's (``CompletionRequest``,
``ChatCompletionRequest``, ...). These envelopes only carry what the hops add.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

RequestKind = Literal["completion", "chat"]


class JSONReply(msgspec.Struct, frozen=True):
    """A complete (non-streamed) answer: a response or an OpenAI error body, already JSON."""

    status: int
    body: bytes


class PrefillResult(msgspec.Struct, frozen=True):
    """What a prefill replica returns to the decode replica that asked it."""

    status: int
    kv_transfer_params: dict[str, Any] | None = None
    error_body: bytes | None = None
    prompt_tokens: int = 0
    replica_id: str = ""
    compute_s: float = 0.0


class ReplicaStats(msgspec.Struct, frozen=True, omit_defaults=True):
    """One engine replica's load and KV-event endpoints: what the engine reports
    (``EngineHost.stats``), what Ray Serve polls for the routers (``record_routing_stats``,
    sent as ``to_dict()`` because Serve keeps routing stats as a dict), and what the heartbeat
    copies into ``ReplicaInfo`` for the P/D decider. ``from_dict`` is the routers' side."""

    kv_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    capacity_blocks: int = 0
    # prompt tokens queued or in prefill at this replica (prefill tier); None: not reported
    queued_prefill_tokens: float | None = None
    prefill_tps: float | None = None  # measured prefill rate, tokens/s; None: not measured
    block_size: int = 0
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    kv_events_topic: str = ""

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ReplicaStats | None":
        if not d:
            return None
        return msgspec.convert(d, cls, strict=False)


class ReplicaInfo(msgspec.Struct, frozen=True):
    """A replica's registration with the control deployment (heartbeated)."""

    replica_id: str
    tier: Literal["prefill", "decode", "ingress"]
    metrics_url: str
    engine_id: str
    node_ip: str
    pid: int = 0
    kv_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    updated_at: float = 0.0
    max_model_len: int = 0  # the engine's, as vLLM resolved it (reported by /v1/models)


class RoutingHint(msgspec.Struct, frozen=True):
    """The prompt as the engines will see it, rendered and hashed once by the ingress.

    ``block_keys`` are ``scheduler.block_keys(token_ids, block_size)``; both tiers' routers and
    decode's P/D decider reuse them. A caller that leaves them empty gets them computed once
    per use (``keys_for``). ``exclude`` names replicas that already failed this request."""

    request_id: str
    token_ids: list[int]
    block_keys: list[int] = []
    # Replicas this request must not be routed to (they already failed it; retry_prefill).
    exclude: list[str] = []
    # The one replica this call is for (an ingress's stream channel to a decode replica);
    # the routers send it there while that replica is a candidate.
    pin: str = ""

    def keys_for(self, block_size: int) -> list[int]:
        from scheduler import block_keys

        return self.block_keys or block_keys(self.token_ids, block_size)


class Accepted(msgspec.Struct, frozen=True):
    """Decode's first item for every request: the replica has started it (``entered`` is
    ``time.time()`` there). Until it arrives the request is in Ray Serve's routing queue or on
    the wire, and the ingress counts it in stage ``to_decode``."""

    entered: float


class DecodeTimeline(msgspec.Struct, frozen=True):
    """When decode reached each step of one request (``time.time()``; 0 = did not happen)."""

    entered: float
    prefill_chosen: float = 0.0   # a prefill replica was reserved (remote prefill only)
    prefill_done: float = 0.0     # kv_transfer_params in hand (remote prefill only)
    first_token: float = 0.0      # the engine's first output (or whole answer) was ready
    where: str = "local"          # where the prompt was prefilled: remote | local | external
    replica: str = ""             # the decode replica that serves the request


class Head(msgspec.Struct, frozen=True):
    """Decode's first answer item: the timeline so far, and the first ``JSONReply`` or SSE text."""

    timeline: DecodeTimeline
    item: JSONReply | str
    token_ids: list[int] = []  # the ids in ``item``'s text when the ingress tracks them (failover)


class Sink(msgspec.Struct, frozen=True, array_like=True):
    """Where decode sends a stream after its ``Head``: the ingress replica's channel ``channel``
    (one per ingress replica and decode replica, ``DecodeServer.channel``), under ``key``."""

    channel: str
    key: int


def answer_items(items: Any) -> list[JSONReply | str]:
    """Decode's items without the envelopes: what the client's answer is made of."""
    out: list[JSONReply | str] = []
    for x in items:
        if isinstance(x, Accepted):
            continue
        out.append(x.item if isinstance(x, Head) else x)
    return out
