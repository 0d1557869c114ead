"""pd_serve's own Prometheus metrics (``pd_serve_*``), listed in docs/metrics.md.

Each replica process registers them in prometheus_client's default registry, next to vLLM's
``vllm:*`` metrics; the ingress's ``/metrics`` gathers every replica's registry and labels each
sample with ``tier`` and ``replica``. Label sets are bounded: never a request id.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
