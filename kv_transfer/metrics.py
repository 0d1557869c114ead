"""Backend-neutral transfer metrics, derived from the connector's own engine metrics.

vLLM's NIXL connector already measures every transfer in each engine process
(``vllm:nixl_*``). pd_serve re-exposes those under names that stay the same whatever the
backend, next to the originals, when ``/metrics`` gathers the replicas:

| pd_serve name | type | from (NIXL) |
|---|---|---|
| ``pd_serve_kv_transfer_bytes_total`` | counter | ``vllm:nixl_bytes_transferred`` (histogram ``_sum``) |
| ``pd_serve_kv_transfer_duration_seconds`` | histogram | ``vllm:nixl_xfer_time_seconds`` |
| ``pd_serve_kv_transfer_failures_total{reason}`` | counter | ``vllm:nixl_num_failed_transfers`` (``transfer``), ``vllm:nixl_num_failed_notifications`` (``notification``) |
| ``pd_serve_kv_leases_expired_total`` | counter | ``vllm:nixl_num_kv_expired_reqs`` (prefill freed blocks decode never pulled) |

Pure functions over ``prometheus_client`` metric families; called once per ``/metrics`` scrape.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric
from prometheus_client.samples import Sample

# backend family -> (pd_serve family, pd_serve type, labels added, which samples: "all" or a suffix)
_NIXL: dict[str, tuple[str, str, dict[str, str], str]] = {
    "vllm:nixl_bytes_transferred": ("pd_serve_kv_transfer_bytes", "counter", {}, "_sum"),
    "vllm:nixl_xfer_time_seconds": ("pd_serve_kv_transfer_duration_seconds", "histogram", {}, "all"),
    "vllm:nixl_num_failed_transfers": ("pd_serve_kv_transfer_failures", "counter", {"reason": "transfer"}, "_total"),
    "vllm:nixl_num_failed_notifications": ("pd_serve_kv_transfer_failures", "counter",
                                           {"reason": "notification"}, "_total"),
    "vllm:nixl_num_kv_expired_reqs": ("pd_serve_kv_leases_expired", "counter", {}, "_total"),
}
_DOC = {
    "pd_serve_kv_transfer_bytes": "KV bytes moved between tiers by the connector.",
    "pd_serve_kv_transfer_duration_seconds": "Duration of KV transfers (decode-side pulls).",
    "pd_serve_kv_transfer_failures": "KV transfers that failed, by reason.",
    "pd_serve_kv_leases_expired": "Prefill requests whose blocks were freed because decode never pulled them "
                                  "within the lease.",
}


def derive(families: Iterable[Metric]) -> list[Metric]:
    """pd_serve_kv_* families computed from the backend families among ``families``."""
    out: dict[str, Metric] = {}
    for fam in families:
        spec = _NIXL.get(fam.name)
        if spec is None:
            continue
        name, mtype, extra, which = spec
        target = out.get(name)
        if target is None:
            target = out[name] = Metric(name, _DOC[name], mtype)
        for s in fam.samples:
            suffix = s.name[len(fam.name):]
            if which != "all" and suffix != which:
                continue
            new_suffix = "_total" if mtype == "counter" else suffix
            target.samples.append(Sample(name + new_suffix, {**s.labels, **extra}, s.value, s.timestamp, s.exemplar))
    return list(out.values())
