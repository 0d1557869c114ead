"""`pd-serve`: start, watch and stop a pd_serve app the way a user at a terminal expects.

    pd-serve check CONFIG     validate a Serve config file (pd_serve's keys and vLLM's engine args)
    pd-serve run CONFIG       check, then `serve run CONFIG`; one line when ready; Ctrl-C stops it all
    pd-serve stop             stop what `pd-serve run` started (from another terminal), or a stray Ray

`run` keeps the exact code path users run on clusters (`serve run CONFIG`), in a session of its
own, with Ray's and vLLM's logs in a file instead of the terminal (``-v`` shows them too). It
prints one line per start-up stage, the URL once ``/health`` answers 200, and the error itself if
a replica fails to start. Stopping sends SIGINT to `serve run` (Serve drains and shuts down the
replicas), and whatever is left of that session after the grace period is killed, so no
``serve run``, ``raylet`` or engine outlives the stop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

IMPORT_PATH = "pd_serve.app:build_app"
DASHBOARD = os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")


def _say(msg: str) -> None:
    print(f"pd-serve: {msg}", flush=True)


def _state_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    d = Path(os.environ.get("PD_SERVE_LAUNCH_DIR") or base / "pd_serve" / "launch")
    d.mkdir(parents=True, exist_ok=True)
    return d


# ------------------------------------------------------------------------------------------------
# check


class ConfigFileError(Exception):
    pass


def load_config(path: str) -> tuple[dict[str, Any], Any]:
    """The Serve config document and its validated pd_serve AppConfig; ConfigFileError says what
    is wrong, in words a user can act on."""
    from pydantic import ValidationError

    from pd_serve.config import AppConfig

    p = Path(path)
    if not p.is_file():
        raise ConfigFileError(f"{path}: no such file")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path}: not valid YAML: {e}") from None
    apps = [a for a in doc.get("applications") or [] if a.get("import_path") == IMPORT_PATH]
    if not apps:
        raise ConfigFileError(f"{path}: no application with import_path: {IMPORT_PATH}")
    try:
        cfg = AppConfig.model_validate(apps[0].get("args") or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "args"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  args.{loc}: {msg}" if loc != "args" else f"  args: {msg}")
        raise ConfigFileError(f"{path}: {len(lines)} error(s) in the pd_serve args:\n" + "\n".join(lines)) from None
    http = doc.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    if (host, port) != (cfg.ingress.host, cfg.ingress.port):
        raise ConfigFileError(
            f"{path}: http_options ({host}:{port}) and args.ingress ({cfg.ingress.host}:{cfg.ingress.port}) "
            "differ; Serve listens on http_options, so set both to the same host and port")
    check_listener(doc.get("proxy_location"), cfg.ingress.listener, path)
    return doc, cfg


def check_listener(proxy_location: Any, listener: str, path: str = "config") -> None:
    """The ingress replicas and Serve's proxy must not both serve (or both not serve) HTTP."""
    disabled = str(proxy_location or "").lower() == "disabled"
    if listener == "replica" and not disabled:
        raise ConfigFileError(
            f"{path}: args.ingress.listener is `replica` (the ingress replicas serve HTTP themselves), so "
            f"Serve's proxy must be off: add `proxy_location: Disabled` at the top level, or set "
            f"args.ingress.listener: serve_proxy")
    if listener == "serve_proxy" and disabled:
        raise ConfigFileError(
            f"{path}: proxy_location: Disabled with args.ingress.listener: serve_proxy leaves nothing serving "
            "HTTP; remove proxy_location: Disabled, or set args.ingress.listener: replica")


def _model_is_local(model: str) -> bool:
    return model.startswith("tiny://") or Path(model).expanduser().is_dir()


# ------------------------------------------------------------------------------------------------
# processes of one session


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    out = []
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == sid:
                out.append(p.pid)
    return out


def _wait(busy: Any, timeout: float) -> None:
    """Poll ``busy()`` until it is falsy or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and busy():
        time.sleep(0.2)


def _kill_session(sid: int, grace: float) -> list[int]:
    """SIGTERM, then SIGKILL, every live process of a session; returns those still alive."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = _session_pids(sid)
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        _wait(lambda: _session_pids(sid), wait)
    return _session_pids(sid)


def _port_owner(host: str, port: int) -> str | None:
    """None if host:port can be bound, else a description of who holds it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return None
        except OSError:
            pass
    with contextlib.suppress(Exception):
        for c in psutil.net_connections("tcp"):
            if c.status == "LISTEN" and c.laddr and c.laddr.port == port and c.pid:
                p = psutil.Process(c.pid)
                return f"pid {c.pid} ({' '.join(p.cmdline())[:80]})"
    return "another process"


# ------------------------------------------------------------------------------------------------
# status while starting


def _token() -> str | None:
    tok = os.environ.get("RAY_AUTH_TOKEN")
    if tok:
        return tok.strip()
    p = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return p.read_text().strip() if p.is_file() else None


def _serve_status(app_name: str) -> dict[str, Any] | None:
    """The app's status from the dashboard's Serve API, or None when it does not answer yet."""
    import httpx

    headers = {"Authorization": f"Bearer {t}"} if (t := _token()) else {}
    try:
        r = httpx.get(f"{DASHBOARD}/api/serve/applications/", headers=headers, timeout=3)
        return (r.json().get("applications") or {}).get(app_name) if r.status_code == 200 else None
    except Exception:
        return None


def _health(url: str) -> int | None:
    import httpx

    try:
        # long enough that Serve's proxy answers (it holds requests until the ingress is up):
        # a probe that gives up first shows in the log as "Client ... disconnected"
        return httpx.get(url + "/health", timeout=15).status_code
    except Exception:
        return None


def _short(msg: str, lines: int = 12) -> str:
    tail = [ln for ln in msg.strip().splitlines() if ln.strip()][-lines:]
    return "\n".join("    " + ln for ln in tail)


# ------------------------------------------------------------------------------------------------
# run


class Runner:
    def __init__(self, config: str, doc: dict, cfg: Any, *, timeout: float, verbose: bool,
                 max_start_failures: int, log_dir: Path) -> None:
        self.config, self.doc, self.cfg = config, doc, cfg
        self.timeout, self.verbose, self.max_start_failures = timeout, verbose, max_start_failures
        app = next(a for a in doc["applications"] if a.get("import_path") == IMPORT_PATH)
        self.app_name = app.get("name", "default")
        self.url = f"http://{cfg.ingress.host}:{cfg.ingress.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_path = log_dir / f"serve-{stamp}.log"
        latest = log_dir / "serve-latest.log"
        with contextlib.suppress(OSError):
            latest.unlink(missing_ok=True)
            latest.symlink_to(self.log_path.name)
        self.proc: subprocess.Popen | None = None
        self.state_file = _state_dir() / f"run-{os.getpid()}.json"
        self.stopping = threading.Event()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Token auth on, said explicitly: Ray then neither warns about it nor refuses our own
        # `serve shutdown`/status calls (the token lives in ~/.ray/auth_token).
        env.setdefault("RAY_AUTH_MODE", "token")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        if _model_is_local(self.cfg.model):
            env.setdefault("HF_HUB_OFFLINE", "1")
            env.setdefault("TRANSFORMERS_OFFLINE", "1")
        return env

    def start(self) -> None:
        serve_bin = Path(sys.executable).with_name("serve")
        cmd = [str(serve_bin) if serve_bin.exists() else "serve", "run", self.config]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if self.verbose else log,
                                     stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        if self.verbose:
            threading.Thread(target=self._tee, args=(log,), daemon=True).start()
        self.state_file.write_text(json.dumps({"launcher": os.getpid(), "serve_run": self.proc.pid,
                                               "url": self.url, "log": str(self.log_path.resolve()),
                                               "config": self.config}))

    def _tee(self, log) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            log.write(line)
            log.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()

    def wait_ready(self) -> bool:
        """Print start-up stages until /health answers 200 (True) or start-up fails (False)."""
        assert self.proc is not None
        t0 = time.monotonic()
        last_line, last_poll, failures_seen = "", 0.0, set()
        while not self.stopping.is_set():
            if self.proc.poll() is not None:
                _say(f"`serve run` exited with code {self.proc.returncode} before the app was ready. "
                     f"Last lines of {self._log_rel()}:\n{_short(self._log_tail())}")
                return False
            if _health(self.url) == 200:
                return True
            now = time.monotonic()
            if now - t0 > self.timeout:
                _say(f"not ready after {self.timeout:.0f} s (--timeout). See {self._log_rel()}; "
                     "README 'Troubleshooting' lists the usual causes.")
                return False
            if now - last_poll >= 2:
                last_poll = now
                st = _serve_status(self.app_name)
                line = self._stage(st)
                if line and line != last_line:
                    _say(f"[{now - t0:5.0f} s] {line}")
                    last_line = line
                for name, d in ((st or {}).get("deployments") or {}).items():
                    msg = d.get("message") or ""
                    if "failed to start" in msg and (name, msg) not in failures_seen:
                        failures_seen.add((name, msg))
                        _say(f"{name}: a replica failed to start:\n{_short(msg, 6)}")
                if (st or {}).get("status") == "DEPLOY_FAILED" or len(failures_seen) >= self.max_start_failures:
                    _say(f"start-up failed; stopping. Full log: {self._log_rel()}")
                    return False
            self.stopping.wait(0.5)
        return False

    def _stage(self, st: dict | None) -> str:
        if st is None:
            return "starting Ray and Serve"
        deps = st.get("deployments") or {}
        parts = [f"{n} {d.get('status', '?').lower()}" for n, d in sorted(deps.items())]
        return f"app {st.get('status', '?').lower()}" + (": " + ", ".join(parts) if parts else "")

    def _log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_rel(self) -> str:
        with contextlib.suppress(ValueError):
            return str(self.log_path.resolve().relative_to(Path.cwd()))
        return str(self.log_path)

    def stop(self, grace: float) -> bool:
        """SIGINT to `serve run`, then the whole session killed after `grace`; True if nothing is left."""
        if self.proc is None:
            return True
        sid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        left = _kill_session(sid, 5.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.state_file.unlink(missing_ok=True)
        if left:
            _say(f"could not stop pids {left}")
        return not left


def _load_or_say(path: str) -> tuple[dict[str, Any], Any] | None:
    try:
        return load_config(path)
    except ConfigFileError as e:
        _say(f"config error: {e}")
        return None


def cmd_run(a: argparse.Namespace) -> int:
    if (loaded := _load_or_say(a.config)) is None:
        return 2
    doc, cfg = loaded
    if owner := _port_owner(cfg.ingress.host, cfg.ingress.port):
        _say(f"port {cfg.ingress.port} on {cfg.ingress.host} is in use by {owner}. A previous run may "
             "still be up: `make stop`. Or set http_options.port and args.ingress.port to a free port.")
        return 3
    r = Runner(a.config, doc, cfg, timeout=a.timeout, verbose=a.verbose,
               max_start_failures=a.max_start_failures, log_dir=Path(a.log_dir))
    t0 = time.monotonic()
    interrupts = []

    def on_signal(signum, frame):
        interrupts.append(signum)
        r.stopping.set()
        if len(interrupts) > 1 and r.proc is not None:  # a second Ctrl-C: no more waiting
            _kill_session(r.proc.pid, 0.5)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _say(f"starting {cfg.model_name} from {a.config}: {_tiers(cfg)}. Logs: {r._log_rel()}")
    r.start()
    ok = r.wait_ready()
    if ok:
        _say(f"ready at {r.url} after {time.monotonic() - t0:.0f} s (OpenAI API under {r.url}/v1). "
             "Ctrl-C or `make stop` stops it.")
        while not r.stopping.is_set():
            if r.proc.poll() is not None:
                _say(f"`serve run` exited with code {r.proc.returncode}. Last lines of {r._log_rel()}:\n"
                     f"{_short(r._log_tail())}")
                ok = False
                break
            r.stopping.wait(1.0)
    t1 = time.monotonic()
    _say("stopping (Ctrl-C again to kill at once)")
    clean = r.stop(a.grace)
    _say(f"stopped in {time.monotonic() - t1:.0f} s" + ("" if clean else "; some processes remain"))
    if interrupts:
        return 0 if clean else 1
    return 0 if ok and clean else 1


def _tiers(cfg: Any) -> str:
    def n(t):
        return (f"{t.autoscaling.min_replicas}-{t.autoscaling.max_replicas} (autoscaling)"
                if t.autoscaling else str(t.fixed_replicas(1)))
    return f"prefill {n(cfg.prefill)}, decode {n(cfg.decode)} replica(s) on {cfg.device}"


# ------------------------------------------------------------------------------------------------
# stop


def _alive(pid: int) -> bool:
    return psutil.pid_exists(pid)


def cmd_stop(a: argparse.Namespace) -> int:
    """Stop every `pd-serve run` recorded here, then any `serve run` or local Ray they left."""
    stopped = 0
    for f in sorted(_state_dir().glob("run-*.json")):
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            f.unlink(missing_ok=True)
            continue
        launcher, sid = int(st.get("launcher", 0)), int(st.get("serve_run", 0))
        if launcher and _alive(launcher):
            _say(f"stopping the app at {st.get('url')} (pid {launcher})")
            os.kill(launcher, signal.SIGINT)
            _wait(lambda: _alive(launcher), a.grace + 15)
            if _alive(launcher):
                os.kill(launcher, signal.SIGKILL)
        if sid:
            _kill_session(sid, 5.0)
        f.unlink(missing_ok=True)
        stopped += 1
    # `serve run` started by hand (or a launcher killed with -9): its session holds its Ray.
    for pid in _serve_run_pids():
        _say(f"stopping `serve run` (pid {pid}) and its local Ray")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        _wait(lambda: _alive(pid), a.grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getsid(pid) == pid:  # its own session (setsid): everything in it is its Ray
                _kill_session(pid, 5.0)
            else:  # started from a shell: never touch the shell's session; `ray stop` below
                os.kill(pid, signal.SIGKILL)
        stopped += 1
    # A Ray cluster started with `ray start` (not by `serve run`): Serve first, then Ray, quietly.
    if Path("/tmp/ray/ray_current_cluster").exists() and _ray_running():
        env = {**os.environ, "RAY_AUTH_MODE": "token"} if _token() else dict(os.environ)
        bin_dir = Path(sys.executable).parent
        log = Path(a.log_dir)
        log.mkdir(parents=True, exist_ok=True)
        with open(log / "stop.log", "ab") as out:
            subprocess.run([str(bin_dir / "serve"), "shutdown", "-y"], env=env, stdout=out, stderr=out, timeout=60)
            subprocess.run([str(bin_dir / "ray"), "stop"], env=env, stdout=out, stderr=out, timeout=120)
        _say(f"stopped the local Ray cluster (details in {log / 'stop.log'})")
        stopped += 1
    left = _serve_run_pids() + ([1] if _ray_running() else [])
    if not stopped:
        _say("nothing to stop")
    if left:
        _say("some Ray processes are still running: `ray stop --force` stops all of them")
        return 1
    return 0


def _cmdlines() -> list[tuple[int, list[str]]]:
    me = os.getpid()
    return [(p.pid, p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]) if p.pid != me]


def _serve_run_pids() -> list[int]:
    """`serve run` processes (argv: python .../serve run ..., or serve run ...)."""
    return [pid for pid, argv in _cmdlines()
            if any(Path(x).name == "serve" and argv[i + 1:i + 2] == ["run"] for i, x in enumerate(argv[:2]))]


def _ray_running() -> bool:
    return any(argv and Path(argv[0]).name in ("raylet", "gcs_server") for _, argv in _cmdlines())


# ------------------------------------------------------------------------------------------------


def cmd_check(a: argparse.Namespace) -> int:
    if (loaded := _load_or_say(a.config)) is None:
        return 2
    cfg = loaded[1]
    _say(f"{a.config}: OK ({cfg.model_name}; {_tiers(cfg)}; http://{cfg.ingress.host}:{cfg.ingress.port})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pd-serve", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate a config file and exit")
    c.add_argument("config")
    r = sub.add_parser("run", help="serve a config file until Ctrl-C or `pd-serve stop`")
    r.add_argument("config")
    r.add_argument("--timeout", type=float, default=float(os.environ.get("PD_SERVE_START_TIMEOUT", 900)),
                   help="give up if not ready after this many seconds (default 900)")
    r.add_argument("--max-start-failures", type=int, default=3,
                   help="give up after this many distinct replica start failures (default 3)")
    r.add_argument("-v", "--verbose", action="store_true", default=bool(os.environ.get("VERBOSE")),
                   help="also print Ray's and vLLM's logs (always written to the log file)")
    s = sub.add_parser("stop", help="stop what `pd-serve run` started, and stray `serve run`/Ray processes")
    for p in (r, s):
        p.add_argument("--grace", type=float, default=45.0,
                       help="seconds Serve gets to drain and stop replicas before they are killed (default 45)")
        p.add_argument("--log-dir", default=".logs", help="where logs go (default .logs)")
    a = ap.parse_args(argv)
    return {"check": cmd_check, "run": cmd_run, "stop": cmd_stop}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
