"""The ingress's /metrics merge: one family per name, process labels added, own labels kept."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from pd_serve import metrics as m
from pd_serve.ingress import _merge

DECODE_PAGE = """\
# HELP pd_serve_routing_decisions_total Replica choices.
# TYPE pd_serve_routing_decisions_total counter
pd_serve_routing_decisions_total{tier="prefill",reason="prefix_hit"} 3.0
# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
"""
PREFILL_PAGE = """\
# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 1.0
"""


def _parse(text: bytes) -> dict[str, list]:
    fams: dict[str, list] = {}
    for f in text_string_to_metric_families(text.decode()):
        assert f.name not in fams, f"family {f.name} appears twice"
        fams[f.name] = f.samples
    return fams


def test_merge_keeps_a_samples_own_tier_and_labels_every_process() -> None:
    m.ROUTING_DECISIONS.labels("decode", "load").inc()  # the ingress's own decode routing
    pages = [(SimpleNamespace(tier="decode", replica_id="d1"), DECODE_PAGE),
             (SimpleNamespace(tier="prefill", replica_id="p1"), PREFILL_PAGE)]
    fams = _parse(_merge(pages, own_replica="i1"))
    routing = {(s.labels.get("tier"), s.labels["replica_tier"], s.labels["replica"]): s.value
               for s in fams["pd_serve_routing_decisions"] if s.name.endswith("_total")
               and s.labels["reason"] in ("prefix_hit", "load")}
    # prefill routing done inside a decode replica stays tier="prefill" (it used to be overwritten)
    assert routing[("prefill", "decode", "d1")] == 3.0
    assert routing[("decode", "ingress", "i1")] >= 1.0
    running = {s.labels["replica"]: (s.labels["tier"], s.value) for s in fams["vllm:num_requests_running"]}
    assert running == {"d1": ("decode", 2.0), "p1": ("prefill", 1.0)}


def test_init_series_creates_every_labelled_series_at_zero() -> None:
    m.init_series("ingress")
    m.init_series("decode")
    fams = _parse(_merge([], own_replica="i1"))
    statuses = {s.labels["status"] for s in fams["pd_serve_ingress_errors"]}
    assert set(m.INGRESS_STATUSES) <= statuses
    decisions = {(s.labels["where"], s.labels["reason"]) for s in fams["pd_serve_prefill"]}
    assert set(m.PREFILL_WHERE_REASONS) <= decisions and ("local", "short_uncached") in decisions
    stages = {s.labels["stage"] for s in fams["pd_serve_requests_in_flight"]}
    assert stages == set(m.INGRESS_STAGES) | set(m.DECODE_STAGES)
    assert {s.labels["reason"] for s in fams["pd_serve_remote_prefill_failures"]} == set(m.PREFILL_FAILURE_REASONS)
