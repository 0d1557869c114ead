"""A new user's first hour (issue 13), on the real app: /v1/models tells the real context
length, /metrics matches docs/metrics.md, and `make serve` stops, by Ctrl-C or `make stop`,
leaving no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import PD_PORT, wait_idle
from tests.support.servers import ROOT

PROCESS_LABELS = {"tier", "replica", "replica_tier", "le", "quantile"}
KEY = "sk-test-first-hour"


def _documented() -> dict[str, str]:
    """docs/metrics.md: metric name -> its labels cell, for every `pd_serve_*` table row."""
    rows = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (mt := re.fullmatch(r"`(pd_serve_\w+)`", cells[0])):
            rows[mt.group(1)] = cells[2]
    return rows


def test_models_reports_the_engines_max_model_len(client: httpx.Client) -> None:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    want = cfg["applications"][0]["args"]["engine_args"]["max_model_len"]
    deadline = time.monotonic() + 10  # the ingress reads it from the replica list (1 s refresh)
    while True:
        card = client.get("/v1/models").json()["data"][0]
        if card["max_model_len"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert card["max_model_len"] == want


def test_live_metrics_match_docs(pd_url: str, client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "metrics please", "max_tokens": 3})
    assert r.status_code == 200
    wait_idle(pd_url)
    text = client.get("/metrics").text
    live: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        # prometheus_client writes a counter's or histogram's creation time as its own
        # `<name>_created` gauge family: part of the documented metric, not one of its own
        base = name.removesuffix("_created")
        if name.endswith("_created") and (base in live or base + "_total" in live):
            continue
        if name.startswith("pd_serve_"):
            live.setdefault(name, set()).update(k for s in fam.samples for k in s.labels)
    docs = _documented()
    undocumented = sorted(set(live) - set(docs))
    assert not undocumented, f"live in /metrics but not in docs/metrics.md: {undocumented}"
    missing = sorted(set(docs) - set(live))
    assert not missing, f"in docs/metrics.md but not in the live /metrics: {missing}"
    for name, labels in live.items():
        for label in labels - PROCESS_LABELS:
            assert f"`{label}`" in docs[name], f"{name}: label `{label}` is not documented"
    # every sample names its process; prefill routing done in decode keeps tier="prefill"
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            assert s.labels.get("replica_tier") in ("ingress", "prefill", "decode"), (s.name, s.labels)
    routing = [s for f in text_string_to_metric_families(text) if f.name == "pd_serve_routing_decisions"
               for s in f.samples if s.name.endswith("_total")]
    assert {(s.labels["tier"], s.labels["replica_tier"]) for s in routing} == {("decode", "ingress"),
                                                                               ("prefill", "decode")}


# ------------------------------------------------------------------------------------------------
# make serve / make stop, as a user runs them


def _config(tmp_path: Path, port: int) -> Path:
    doc = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    doc["http_options"]["port"] = port
    doc["applications"][0]["args"]["ingress"]["port"] = port
    doc["applications"][0]["args"]["ingress"]["api_keys"] = [KEY]
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _start(tmp_path: Path, port: int) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "make-serve.out"
    env = {**os.environ, "PD_SERVE_LAUNCH_DIR": str(tmp_path / "run")}
    proc = subprocess.Popen(["make", "-s", "serve", f"CONFIG={_config(tmp_path, port)}"], cwd=ROOT, env=env,
                            stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while "ready at" not in out.read_text():
        assert proc.poll() is None, f"make serve exited early:\n{out.read_text()}"
        assert time.monotonic() < deadline, f"not ready after 600 s:\n{out.read_text()}"
        time.sleep(1)
    return proc, out


def _leftovers(serve_run_pid: int | None) -> list[str]:
    """Processes of the launched app still alive: its `serve run` session, Ray, engines."""
    left = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[0] == "Z":
            continue
        if (serve_run_pid and int(stat[3]) == serve_run_pid) or re.search(
                r"raylet|gcs_server|serve run|pd-serve run|VLLM::", argv):
            left.append(f"{d.name}: {argv[:100]}")
    return left


def _serve_run_pid(out: Path) -> int | None:
    for f in (out.parent / "run").glob("run-*.json"):
        import json

        return int(json.loads(f.read_text())["serve_run"])
    return None


@pytest.mark.own_app("zz-make-serve")
@pytest.mark.parametrize("how", ["ctrl_c", "make_stop"])
def test_make_serve_then_stop_leaves_nothing_running(how: str, apps, tmp_path: Path) -> None:
    apps.close()  # the shared app's engines must be gone: two engines at most on this machine
    port = PD_PORT + 5
    t0 = time.monotonic()
    proc, out = _start(tmp_path, port)
    try:
        _serve_and_stop(how, proc, out, port, t0, tmp_path)
    finally:  # whatever failed above, leave nothing running for the next test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(120)


def _serve_and_stop(how: str, proc: subprocess.Popen, out: Path, port: int, t0: float, tmp_path: Path) -> None:
    ready_s = time.monotonic() - t0
    sid = _serve_run_pid(out)
    assert sid is not None
    url = f"http://127.0.0.1:{port}"
    body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401 and set(r.json()["error"]) >= {"message", "type", "code"}, r.text
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # probes and scrapers need no key
    assert "pd_serve_ingress_errors_total" in httpx.get(url + "/metrics", timeout=30).text
    text = out.read_text()
    served = text[text.index("pd-serve: starting"):]  # after make's own steps (install, model)
    assert f"ready at {url}" in served and len(served.splitlines()) < 30, served  # quiet: stages, not logs
    t1 = time.monotonic()
    if how == "ctrl_c":  # what a terminal does: SIGINT to the whole foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        stop = subprocess.run(["make", "-s", "stop"], cwd=ROOT, capture_output=True, text=True, timeout=180,
                              env={**os.environ, "PD_SERVE_LAUNCH_DIR": str(tmp_path / "run")})
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert len(stop.stdout) < 2000, stop.stdout  # no 27 KB of killed command lines
    proc.wait(120)
    stop_s = time.monotonic() - t1
    assert "stopped in" in out.read_text()
    deadline = time.monotonic() + 10
    while _leftovers(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _leftovers(sid) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
    print(f"\n{how}: ready in {ready_s:.0f} s, stopped in {stop_s:.0f} s")
