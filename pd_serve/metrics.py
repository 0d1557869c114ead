"""pd_serve's own Prometheus metrics (``pd_serve_*``), listed in docs/metrics.md.

Each replica process registers them in prometheus_client's default registry, next to vLLM's
``vllm:*`` metrics; the ingress's ``/metrics`` gathers every replica's registry and labels each
sample with ``tier`` and ``replica``. Label sets are bounded: never a request id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFILL_DECISIONS = Counter(
    "pd_serve_prefill_total",
    "Requests by where their prompt was prefilled (local = on the decode engine) and why.",
    ["where", "reason"],
)
REMOTE_PREFILL_FAILURES = Counter(
    "pd_serve_remote_prefill_failures_total",
    "Remote prefills that failed, by reason, before the failure policy applied.",
    ["reason"],
)
REMOTE_PREFILL_SECONDS = Histogram(
    "pd_serve_remote_prefill_seconds",
    "Decode-side time from asking the prefill tier to holding its kv_transfer_params.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REQUESTS = Counter(
    "pd_serve_requests_total",
    "Requests finished by the decode tier, by API and outcome.",
    ["api", "outcome"],
)
CLIENT_ABORTS = Counter(
    "pd_serve_client_aborts_total",
    "Requests cancelled by the client (disconnect) while in flight, by phase.",
    ["phase"],
)
INGRESS_ERRORS = Counter(
    "pd_serve_ingress_errors_total",
    "Requests rejected at the ingress, by HTTP status.",
    ["status"],
)
ROUTING_DECISIONS = Counter(
    "pd_serve_routing_decisions_total",
    "Replica choices by the prefix-aware router, by tier and by why the winner won.",
    ["tier", "reason"],
)
PREFIX_HIT_TOKENS = Counter(
    "pd_serve_prefix_hit_tokens_total",
    "Prompt tokens the chosen replica already cached (per the router's index), by tier.",
    ["tier"],
)
PROMPT_TOKENS_ROUTED = Counter(
    "pd_serve_routed_prompt_tokens_total",
    "Prompt tokens of the requests the router placed, by tier (denominator of the hit rate).",
    ["tier"],
)
SCHEDULING_SECONDS = Histogram(
    "pd_serve_scheduling_seconds",
    "Time the router spent choosing a replica (hashing, index match, plugins), by tier.",
    ["tier"],
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2),
)
SCHEDULER_PLUGIN_SECONDS = Histogram(
    "pd_serve_scheduler_plugin_seconds",
    "Time per scheduler plugin per decision, by tier and plugin name.",
    ["tier", "plugin"],
    buckets=(1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3),
)
INGRESS_RETRIES = Counter(
    "pd_serve_ingress_retries_total",
    "Requests re-sent by the ingress because their decode replica failed before answering, by error.",
    ["error"],
)
PREFILL_RETRIES = Counter(
    "pd_serve_prefill_retries_total",
    "Requests prefilled again on another prefill replica (failure_policy: retry_prefill), by what failed: "
    "the remote prefill itself (prefill) or decode's KV pull (pull).",
    ["stage"],
)
REQUESTS_AWAITING_PULL = Gauge(
    "pd_serve_kv_requests_awaiting_pull",
    "Prefilled requests whose blocks this engine holds until decode pulls them or the lease expires.",
)
BLOCKS_AWAITING_PULL = Gauge(
    "pd_serve_kv_blocks_awaiting_pull",
    "KV blocks this engine holds until decode pulls them or the lease expires (kv_transfer.lease_s).",
)
PHASE_SECONDS = Histogram(
    "pd_serve_phase_seconds",
    "Time each request spent in each phase up to its first byte, measured by the ingress "
    "(phases in pd_serve/phases.py; their sum is the ingress's time to first byte).",
    ["phase"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REQUESTS_IN_FLIGHT = Gauge(
    "pd_serve_requests_in_flight",
    "Requests in each stage right now: at the ingress (`ingress`, `to_decode`, `in_decode`, "
    "`streaming`) and, labelled with tier=decode, inside a decode replica (`prefill_select`, "
    "`prefill`, `first_token`, `streaming`).",
    ["stage"],
)

STREAM_FAILOVERS = Counter(
    "pd_serve_stream_failovers_total",
    "Streams whose decode replica died mid-stream, by outcome: resumed on another decode replica "
    "from the tokens already sent, or failed (the client got an in-band error and [DONE]).",
    ["outcome"],
)


# ------------------------------------------------------------------------------------------------
# Every series present from the start, at 0: a counter that appears only after its first event
# cannot be told apart from a scrape that missed it, and rate() over it starts wrong.

INGRESS_STATUSES = ("400", "401", "404", "405", "413", "422", "429", "500", "502", "503")
REPLICA_GONE = ("RayActorError", "ReplicaUnavailableError")
PREFILL_FAILURE_REASONS = ("timeout", "replica_gone", "error", "http_5xx")
INGRESS_STAGES = ("ingress", "to_decode", "in_decode", "streaming")
DECODE_STAGES = ("prefill_select", "prefill", "first_token", "streaming")
# (where, reason) of pd_serve_prefill_total that servers.py sets itself; the decider's own
# reasons (scheduler.decider.DeciderReason) are added from the enum.
PREFILL_WHERE_REASONS = (
    ("remote", "remote"), ("remote", "prefill_retry"), ("remote", "pull_retry"),
    ("local", "no_prefill_tier"), ("local", "prefill_unavailable"), ("local", "retry_unavailable"),
    ("local", "remote_failed"), ("local", "retries_exhausted"), ("local", "pull_failed"),
    ("external", "preset"),
)


def _routing_series(tier: str) -> None:
    from scheduler.framework import RouteReason

    for reason in [*(str(r) for r in RouteReason), "fallback", "no_eligible"]:
        ROUTING_DECISIONS.labels(tier, reason)
    PREFIX_HIT_TOKENS.labels(tier)
    PROMPT_TOKENS_ROUTED.labels(tier)
    SCHEDULING_SECONDS.labels(tier)


def init_series(role: str) -> None:
    """Create, at 0, every labelled pd_serve_* series this process can emit.

    role: ``ingress`` (decode routing runs there), ``decode`` (the P/D decision and prefill
    routing) or ``prefill``. Unlabelled metrics exist from import."""
    if role == "ingress":
        for s in INGRESS_STATUSES:
            INGRESS_ERRORS.labels(s)
        for e in REPLICA_GONE:
            INGRESS_RETRIES.labels(e)
        from pd_serve.phases import PHASES

        for p in PHASES:
            PHASE_SECONDS.labels(p)
        for st in INGRESS_STAGES:
            REQUESTS_IN_FLIGHT.labels(st)
        for outcome in ("resumed", "failed"):
            STREAM_FAILOVERS.labels(outcome)
        CLIENT_ABORTS.labels("before_first_byte")
        _routing_series("decode")
    elif role == "decode":
        from scheduler.decider import DeciderReason

        for d in DeciderReason:
            PREFILL_DECISIONS.labels("remote" if d == DeciderReason.REMOTE else "local", str(d))
        for where, reason in PREFILL_WHERE_REASONS:
            PREFILL_DECISIONS.labels(where, reason)
        for r in PREFILL_FAILURE_REASONS:
            REMOTE_PREFILL_FAILURES.labels(r)
        for api in ("completions", "chat"):
            for outcome in ("ok", "error", "aborted"):
                REQUESTS.labels(api, outcome)
        for phase in ("before_start", "prefill", "decode"):
            CLIENT_ABORTS.labels(phase)
        for stage in ("prefill", "pull"):
            PREFILL_RETRIES.labels(stage)
        for st in DECODE_STAGES:
            REQUESTS_IN_FLIGHT.labels(st)
        _routing_series("prefill")


# ------------------------------------------------------------------------------------------------
# Admission (pd_serve/admission.py), in the ingress. `tenant` takes config tenant names only, plus
# `none` (no valid key), `anonymous` (auth off) and `default` (the deprecated ingress.api_keys);
# `priority` takes the config's class names.

ADMISSIONS = Counter(
    "pd_serve_admission_total",
    "Admission decisions at the ingress, by tenant, outcome (admitted, rejected, cancelled) and reason.",
    ["tenant", "outcome", "reason"],
)
ADMISSION_TOKENS_RESERVED = Counter(
    "pd_serve_admission_tokens_reserved_total",
    "Tokens reserved at admission (prompt + max_tokens), by tenant.",
    ["tenant"],
)
ADMISSION_TOKENS_USED = Counter(
    "pd_serve_admission_tokens_used_total",
    "Tokens charged when requests ended (actual prompt + completion), by tenant.",
    ["tenant"],
)
ADMISSION_TOKENS_REFUNDED = Counter(
    "pd_serve_admission_tokens_refunded_total",
    "Reserved tokens given back when requests ended (reserved - used; all of it for a request "
    "rejected after its reservation), by tenant.",
    ["tenant"],
)
ADMISSION_QUEUE_DEPTH = Gauge(
    "pd_serve_admission_queue_depth",
    "Requests waiting for an admission slot, by priority class.",
    ["priority"],
)
ADMISSION_IN_FLIGHT = Gauge(
    "pd_serve_admission_in_flight",
    "Requests holding an admission slot (admitted, not yet settled), by priority class.",
    ["priority"],
)
# (outcome, reason) of pd_serve_admission_total
ADMISSION_OUTCOMES = (
    ("admitted", "ok"), ("admitted", "queued"),
    ("rejected", "unauthorized"), ("rejected", "revoked"), ("rejected", "tokens"),
    ("rejected", "too_large"), ("rejected", "concurrency"), ("rejected", "queue_full"),
    ("rejected", "deadline"), ("rejected", "shed"), ("rejected", "queue_timeout"),
    ("cancelled", "client"),
)


def init_admission_series(tenants: list[str] | tuple[str, ...], classes: list[str] | tuple[str, ...]) -> None:
    """Create, at 0, the admission series of these tenants and priority classes, and
    `{tenant="none", outcome="rejected", reason="unauthorized"}` (requests without a valid key)."""
    ADMISSIONS.labels("none", "rejected", "unauthorized")
    for t in tenants:
        for outcome, reason in ADMISSION_OUTCOMES:
            if reason != "unauthorized":
                ADMISSIONS.labels(t, outcome, reason)
        ADMISSION_TOKENS_RESERVED.labels(t)
        ADMISSION_TOKENS_USED.labels(t)
        ADMISSION_TOKENS_REFUNDED.labels(t)
    for c in classes:
        ADMISSION_QUEUE_DEPTH.labels(c)
        ADMISSION_IN_FLIGHT.labels(c)


# ------------------------------------------------------------------------------------------------
# Waking a prefill tier that has no replica (pd_serve/servers.py `PrefillWaker`), in decode
# replicas: at most one wake call outstanding per decode replica, so `sent` minus `answered` and
# `failed` is 0 or 1 per replica.

PREFILL_WAKES = Counter(
    "pd_serve_prefill_wakes_total",
    "Wake calls a decode replica sent to a prefill tier with no live replica so that Ray Serve "
    "scales it up (sent), and how they ended: a prefill replica answered (answered) or the call "
    "failed (failed).",
    ["outcome"],
)
WAKE_OUTCOMES = ("sent", "answered", "failed")


def init_wake_series() -> None:
    """Create, at 0, the `pd_serve_prefill_wakes_total` series (decode replicas)."""
    for outcome in WAKE_OUTCOMES:
        PREFILL_WAKES.labels(outcome)
