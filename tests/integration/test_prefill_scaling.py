"""The prefill tier scales from zero to one replica and back, on real engines, through pd_serve's
policy (issue 9, item 5): while it has no replica decode prefills locally and wakes it
(``PrefillWaker``); once it is up, prompts go remote and their KV arrives by transfer; after
idling it goes back to zero and requests are prefilled locally again. Greedy token ids are the
same whichever engine prefilled.

The scale-down breaks no transfer (issue 9, gap A): KV prefilled just before the replica is told
to stop, and not pulled yet, is still pulled after it was told to stop, since the stopping
replica keeps its engine up until decode has pulled it (``PrefillServer.__del__``).

1 -> 2 -> 1 on the prefill tier needs three engines (decode + two prefill); a 2-core machine runs
two at most, so it is not tested here."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration import cases
from tests.integration.conftest import wait_idle
from tests.support.metrics import Scrape
from tests.support.servers import load_app_args

UP_WITHIN_S = 240      # cold start of one prefill replica (engine included) on 2 busy cores
DOWN_DELAY_S = 30      # downscale_delay_s: long enough to run the remote phase at one replica
DOWN_WITHIN_S = DOWN_DELAY_S + 90
LEASE_S = 120          # kv_transfer.lease_s: the KV held across the scale-down outlives the downscale delay
STOPPED_AFTER_PULL_S = 30  # the stopping replica exits this soon after the pull, long before the lease
SOURCE = "vllm:prompt_tokens_by_source_total"


def scale_to_zero_args() -> dict:
    args = load_app_args(prefill={"autoscaling": {
        "min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
        "upscale_delay_s": 1, "downscale_delay_s": DOWN_DELAY_S}})
    args["prefill"].pop("replicas", None)  # decode stays at its fixed 1 replica
    args["kv_transfer"]["lease_s"] = LEASE_S
    return args


def _prefill_states() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications["pd_serve"]
    return dict(app.deployments["PrefillServer"].replica_states)


def _prefill_running() -> int:
    return _prefill_states().get("RUNNING", 0)


def _hold_kv(model_path: str, i: int, request_id: str):
    """Prefill prompt ``i`` on the prefill replica the way decode does, and pull nothing: the
    replica then holds its blocks for decode. Returns (prompt token ids, PrefillResult)."""
    from ray import serve
    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from kv_transfer import prefill_request_params
    from pd_serve.protocol import RoutingHint

    body = _body(i)
    ids = AutoTokenizer.from_pretrained(model_path)(body["prompt"]).input_ids
    req = CompletionRequest(**{**body, "prompt": ids, "max_tokens": 1, "request_id": request_id,
                               "kv_transfer_params": prefill_request_params()})
    prefill = serve.get_deployment_handle("PrefillServer", app_name="pd_serve")
    res = prefill.prefill.remote("completion", req, RoutingHint(request_id, ids)).result()
    assert res.status == 200 and res.kv_transfer_params["remote_block_ids"], res
    return ids, res


def _decode_with(decode, i: int, ids: list[int], request_id: str, kv_transfer_params: dict) -> list[int]:
    """Prompt ``i`` on decode with KV prefilled elsewhere (decode only pulls): its token ids."""
    import json

    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from pd_serve.protocol import JSONReply, answer_items

    req = CompletionRequest(**{**_body(i), "prompt": ids, "request_id": request_id,
                               "kv_transfer_params": kv_transfer_params})
    out = answer_items(decode.options(stream=True).generate.remote("completion", req, None))
    assert len(out) == 1 and isinstance(out[0], JSONReply) and out[0].status == 200, out
    return json.loads(out[0].body)["choices"][0]["token_ids"]


def _body(i: int) -> dict:
    # distinct prompts (nothing cached anywhere), ~200 tokens: remote with remote_prefill_min_tokens 0
    return {"model": "tiny-llama", "prompt": cases.text(200, 9000 + i), "max_tokens": 12, "temperature": 0,
            "return_token_ids": True}


def _post(c: httpx.Client, url: str, body: dict) -> tuple[list[int], int, dict[str, float]]:
    """One request with a scrape on each side: (token ids, prompt tokens, metric deltas)."""
    before = Scrape.get(url)
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text[:300]
    after = Scrape.get(url)
    d = r.json()

    def delta(name: str, **labels: str) -> float:
        return after.sum(name, **labels) - before.sum(name, **labels)

    deltas = {
        "local": delta("pd_serve_prefill_total", where="local"),
        "remote": delta("pd_serve_prefill_total", where="remote"),
        "no_prefill_workers": delta("pd_serve_prefill_total", where="local", reason="no_prefill_workers"),
        "prefill_unavailable": delta("pd_serve_prefill_total", where="local", reason="prefill_unavailable"),
        "by_transfer": delta(SOURCE, source="external_kv_transfer", tier="decode"),
        "decode_computed": delta(SOURCE, source="local_compute", tier="decode"),
    }
    return d["choices"][0]["token_ids"], d["usage"]["prompt_tokens"], deltas


def _health(c: httpx.Client) -> dict:
    return c.get("/health").json()


@pytest.mark.own_app("prefill-scale-to-zero")
def test_prefill_tier_scales_from_zero_to_one_and_back_with_local_prefill_at_zero(apps, model_path: str) -> None:
    url = apps.get("prefill-scale-to-zero", scale_to_zero_args())
    from ray import serve

    decode = serve.get_deployment_handle("DecodeServer", app_name="pd_serve")
    with httpx.Client(base_url=url, timeout=120) as c:
        assert _prefill_running() == 0 and _health(c)["prefill_replicas"] == 0
        wakes0 = Scrape.get(url).sum("pd_serve_prefill_wakes_total", outcome="sent")

        # -- at zero: every request answers, prefilled on decode; the first one wakes the tier --
        local_ids: dict[int, list[int]] = {}
        unavailable = 0  # local because the starting replica was in decode's view but not yet routable
        t0 = time.monotonic()
        t_health_up = t_first_remote = None
        i = 0
        while t_first_remote is None:
            assert time.monotonic() - t0 < UP_WITHIN_S, (
                f"the prefill tier did not take a request within {UP_WITHIN_S} s of the first wake "
                f"({i} requests, all prefilled locally)")
            ids, _, d = _post(c, url, _body(i))
            if d["remote"]:
                t_first_remote = time.monotonic() - t0
                assert d["local"] == 0
            else:
                assert d["local"] == 1, d
                local_ids[i] = ids
                # no replica in decode's view; or, for a moment while one starts, in its view but
                # not yet in Serve's router (decode waited prefill_select_timeout_s for it)
                assert d["no_prefill_workers"] + d["prefill_unavailable"] == 1, d
                assert i > 0 or d["no_prefill_workers"] == 1, d
                unavailable += d["prefill_unavailable"]
            if t_health_up is None and _health(c)["prefill_replicas"] >= 1:
                t_health_up = time.monotonic() - t0
            i += 1
            time.sleep(0.5)
        at_zero = i - 1
        assert at_zero >= 1 and len(local_ids) == at_zero
        while t_health_up is None:  # /health's view refreshes every second
            assert time.monotonic() - t0 < UP_WITHIN_S + 10
            if _health(c)["prefill_replicas"] >= 1:
                t_health_up = time.monotonic() - t0
            time.sleep(0.2)
        s = Scrape.get(url)
        assert s.sum("pd_serve_prefill_wakes_total", outcome="sent") - wakes0 >= 1
        assert s.sum("pd_serve_prefill_wakes_total", outcome="answered") >= 1  # a prefill replica ran it
        assert s.sum("pd_serve_prefill_wakes_total", outcome="failed") == 0
        assert _prefill_running() == 1

        # -- at one: the same prompts again, remote now; same tokens, KV by transfer --
        assert decode.reset_prefix_cache.remote().result()  # so decode computes nothing itself
        redo = sorted(local_ids)[:3]
        for k in redo:
            ids, prompt_tokens, d = _post(c, url, _body(k))
            assert d["remote"] == 1, f"request {k} was not prefilled remotely at one replica: {d}"
            assert ids == local_ids[k], f"prompt {k}: remote prefill gave other token ids than local"
            assert d["by_transfer"] == prompt_tokens and d["decode_computed"] == 0, d
        wait_idle(url, engines=2, timeout=30)  # both engines idle, prefill holds no block for a pull

        # -- KV prefilled and not pulled yet when the replica is told to stop --
        k_held, rid = redo[0], "held-across-scale-down"
        held_ids, held = _hold_kv(model_path, k_held, rid)
        s = Scrape.get(url)
        held_blocks = s.values("pd_serve_kv_blocks_awaiting_pull", tier="prefill")
        assert held_blocks and held_blocks[0] >= 1 and s.values("pd_serve_kv_requests_awaiting_pull",
                                                                tier="prefill") == [1], held_blocks
        t_last_remote = time.monotonic()

        # -- idle: back to zero --
        # Serve told the replica to stop (no longer RUNNING) and it left decode's view (/health);
        # the engine is still up while the KV awaits its pull
        while not (_prefill_running() == 0 and _health(c)["prefill_replicas"] == 0):
            assert time.monotonic() - t_last_remote < DOWN_WITHIN_S, (
                f"the prefill tier did not go back to zero within {DOWN_WITHIN_S} s of idling")
            time.sleep(0.2)
        t_down = time.monotonic() - t_last_remote
        states_at_pull = _prefill_states()

        # -- the held KV is pulled from the stopping replica: same tokens, all of it by transfer --
        assert decode.reset_prefix_cache.remote().result()  # so the whole prompt must come by transfer
        before = Scrape.get(url)
        t_pull = time.monotonic()
        pulled_ids = _decode_with(decode, k_held, held_ids, rid, held.kv_transfer_params)
        pull_s = time.monotonic() - t_pull
        after_pull = Scrape.get(url)

        def pulled(name: str, **labels: str) -> float:
            return after_pull.sum(name, tier="decode", **labels) - before.sum(name, tier="decode", **labels)

        assert pulled_ids == local_ids[k_held], "the KV held across the scale-down gave other token ids"
        assert pulled(SOURCE, source="external_kv_transfer") == len(held_ids), (
            f"decode did not pull the held KV from the stopping prefill replica (stop states when the "
            f"pull was sent: {states_at_pull}): by transfer {pulled(SOURCE, source='external_kv_transfer')}, "
            f"computed {pulled(SOURCE, source='local_compute')} of {len(held_ids)} prompt tokens")
        assert pulled(SOURCE, source="local_compute") == 0
        assert pulled("pd_serve_prefill_total", where="external", reason="preset") == 1
        assert pulled("vllm:nixl_num_failed_transfers_total") == 0
        assert states_at_pull.get("STOPPING", 0) == 1, states_at_pull  # it was still stopping, waiting
        # ... and once pulled, the replica stops at once: not at the lease, not killed at its timeout
        while _prefill_states():
            assert time.monotonic() - t_pull < STOPPED_AFTER_PULL_S, (
                f"the stopping prefill replica did not exit within {STOPPED_AFTER_PULL_S} s of the pull: "
                f"{_prefill_states()}")
            time.sleep(0.2)
        t_exit = time.monotonic() - t_pull
        time.sleep(2)  # decode's view of the tier (heartbeat, 1 s) catches up with /health's

        # -- at zero again: still 200, local, same tokens; and the tier is woken again --
        wakes1 = Scrape.get(url).sum("pd_serve_prefill_wakes_total", outcome="sent")
        for k in redo[:2]:
            ids, _, d = _post(c, url, _body(k))
            assert d["local"] == 1 and d["no_prefill_workers"] == 1, d
            assert ids == local_ids[k]
        after = wait_idle(url, engines=1, timeout=60)
        assert after.sum("pd_serve_prefill_wakes_total", outcome="sent") - wakes1 == 1  # one outstanding at most
    print(f"\nprefill 0->1: /health showed 1 replica after {t_health_up:.1f} s, first remote prefill after "
          f"{t_first_remote:.1f} s ({at_zero} requests prefilled locally meanwhile, all 200, "
          f"{unavailable:.0f} of them as prefill_unavailable); "
          f"{len(redo)} remote with identical token ids; 1->0 after {t_down:.1f} s idle "
          f"(downscale_delay_s {DOWN_DELAY_S}); KV held across the stop ({held_blocks[0]:.0f} blocks, "
          f"{len(held_ids)} tokens) pulled from the stopping replica in {pull_s:.2f} s with identical ids, "
          f"replica gone {t_exit:.1f} s after the pull (lease_s {LEASE_S}); 2 local again at zero with identical ids")
