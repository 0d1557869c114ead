"""The /metrics merge (control builds it): one family per name, process labels added, own labels kept."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pd_serve import metrics as m
from pd_serve.control import Control
from pd_serve.metrics_page import merge
from pd_serve.protocol import ReplicaInfo

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
    pages = [("decode", "d1", DECODE_PAGE), ("prefill", "p1", PREFILL_PAGE),
             ("ingress", "i1", generate_latest().decode())]  # the ingress's own page
    fams = _parse(merge(pages))
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
    fams = _parse(merge([("ingress", "i1", generate_latest().decode())]))
    statuses = {s.labels["status"] for s in fams["pd_serve_ingress_errors"]}
    assert set(m.INGRESS_STATUSES) <= statuses
    decisions = {(s.labels["where"], s.labels["reason"]) for s in fams["pd_serve_prefill"]}
    assert set(m.PREFILL_WHERE_REASONS) <= decisions and ("local", "short_uncached") in decisions
    stages = {s.labels["stage"] for s in fams["pd_serve_requests_in_flight"]}
    assert stages == set(m.INGRESS_STAGES) | set(m.DECODE_STAGES)
    assert {s.labels["reason"] for s in fams["pd_serve_remote_prefill_failures"]} == set(m.PREFILL_FAILURE_REASONS)


class _Http:
    """Answers each replica's metrics_url with its page; counts the fetches."""

    def __init__(self, pages: dict[str, str]) -> None:
        self.pages, self.fetches = pages, 0

    async def get(self, url: str):
        self.fetches += 1
        await asyncio.sleep(0.01)
        if url not in self.pages:
            raise ConnectionError(url)
        return SimpleNamespace(status_code=200, text=self.pages[url])


def _info(tier: str, rid: str) -> ReplicaInfo:
    return ReplicaInfo(replica_id=rid, tier=tier, metrics_url=f"http://h/{rid}", engine_id="", node_ip="h", pid=1)


def test_control_merges_every_registered_replica_and_shares_one_gather() -> None:
    async def go():
        c = Control()
        for tier, rid in (("decode", "d1"), ("prefill", "p1"), ("ingress", "i1"), ("prefill", "gone")):
            c.register(_info(tier, rid))
        c._http = http = _Http({"http://h/d1": DECODE_PAGE, "http://h/p1": PREFILL_PAGE,
                                "http://h/i1": generate_latest().decode()})
        a, b = await asyncio.gather(c.metrics_page(), c.metrics_page())  # two scrapes at once
        assert a == b and http.fetches == 4  # one gather for both; "gone" failed and is left out
        running = {s.labels["replica"] for s in _parse(a)["vllm:num_requests_running"]}
        assert running == {"d1", "p1"}
        assert any(s.labels["replica_tier"] == "ingress" for s in _parse(a)["pd_serve_ingress_errors"])
        await c.metrics_page()
        assert http.fetches == 8  # a later scrape gathers again

    asyncio.run(go())
