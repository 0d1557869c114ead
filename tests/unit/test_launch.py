"""`pd-serve check/run` refuse a bad config before anything starts (issue 13: a typo in
engine_args used to make Serve restart the replica forever)."""

from __future__ import annotations

import subprocess
import sys
import time

import yaml

from tests.unit.conftest import ROOT


def _write(tmp_path, mutate) -> str:
    doc = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    mutate(doc)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def _run(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {"PD_SERVE_LAUNCH_DIR": str(tmp_path / "run"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "pd_serve.launch", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


def test_run_with_an_engine_arg_typo_exits_2_naming_the_key_and_starts_nothing(tmp_path) -> None:
    cfg = _write(tmp_path, lambda d: d["applications"][0]["args"]["engine_args"].update(max_model_lenn=512))
    t0 = time.monotonic()
    r = _run("run", cfg, "--log-dir", str(tmp_path / "logs"), tmp_path=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "engine_args.max_model_lenn" in r.stdout and "did you mean `max_model_len`" in r.stdout
    assert time.monotonic() - t0 < 120  # seconds here (vLLM's import); the point is that nothing started
    assert not (tmp_path / "logs").exists()  # refused before `serve run` or a log file existed


def test_check_reports_every_error_with_its_path(tmp_path) -> None:
    def mutate(d):
        d["applications"][0]["args"]["decode"]["replica"] = 2
        d["http_options"]["port"] = 8001
    r = _run("check", _write(tmp_path, mutate), tmp_path=tmp_path)
    assert r.returncode == 2
    assert "args.decode.replica: Extra inputs are not permitted" in r.stdout


def test_check_http_options_must_match_ingress(tmp_path) -> None:
    r = _run("check", _write(tmp_path, lambda d: d["http_options"].update(port=8001)), tmp_path=tmp_path)
    assert r.returncode == 2 and "http_options (127.0.0.1:8001)" in r.stdout


def test_check_accepts_the_shipped_config(tmp_path) -> None:
    r = _run("check", str(ROOT / "configs" / "tiny-cpu.yaml"), tmp_path=tmp_path)
    assert r.returncode == 0 and "OK (tiny-llama" in r.stdout



def test_check_listener_and_proxy_location_agree(tmp_path) -> None:
    """`ingress.listener: replica` binds the port in the ingress replica: Serve's proxy must be off
    (both set SO_REUSEPORT, so the kernel would silently split clients between them)."""
    r = _run("check", _write(tmp_path, lambda d: d.update(proxy_location="HeadOnly")), tmp_path=tmp_path)
    assert r.returncode == 2 and "add `proxy_location: Disabled`" in r.stdout, r.stdout

    def proxy_listener_without_proxy(d):
        d["applications"][0]["args"]["ingress"]["listener"] = "serve_proxy"
    r = _run("check", _write(tmp_path, proxy_listener_without_proxy), tmp_path=tmp_path)
    assert r.returncode == 2 and "leaves nothing serving HTTP" in r.stdout, r.stdout

    def proxy_listener_with_proxy(d):
        proxy_listener_without_proxy(d)
        d["proxy_location"] = "HeadOnly"
    r = _run("check", _write(tmp_path, proxy_listener_with_proxy), tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout
