"""Node-local allocation of side-channel ports and CPU cores for engine replicas.

Every engine on a node needs its own NIXL side-channel port, and on CPU hosts its own core.
Replicas start independently (Ray Serve gives them no rank), so they claim resources through a
lock file per node: ``claim()`` takes the first free item, records the claimant's pid, and
reclaims items whose pid is dead (a replica that crashed never leaks its port or core).

Called once per replica at start-up. Not on any request path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterable
from pathlib import Path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def _state_dir() -> Path:
    d = Path(os.environ.get("PD_SERVE_RUN_DIR", "/tmp/pd_serve"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def claim(pool: str, candidates: Iterable[str], *, owner_pid: int | None = None,
          prefer_least_used: bool = True) -> str:
    """Claim one of ``candidates`` in the node-local ``pool``; return it.

    When all candidates are taken by live processes and ``prefer_least_used`` is set, the
    candidate with the fewest live claims is shared (e.g. more replicas than cores); otherwise
    RuntimeError is raised.
    """
    owner = owner_pid or os.getpid()
    cands = list(candidates)
    if not cands:
        raise ValueError(f"no candidates to claim in pool {pool!r}")
    path = _state_dir() / f"{pool}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            claims: dict[str, list[int]] = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            claims = {}
        claims = {k: [p for p in v if _pid_alive(p)] for k, v in claims.items()}
        counts = {c: len(claims.get(c, [])) for c in cands}
        free = [c for c in cands if counts[c] == 0]
        if free:
            choice = free[0]
        elif prefer_least_used:
            choice = min(cands, key=lambda c: counts[c])
        else:
            raise RuntimeError(f"all {len(cands)} items of pool {pool!r} are claimed")
        claims.setdefault(choice, []).append(owner)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in claims.items() if v}))
        tmp.replace(path)
    return choice


def release(pool: str, item: str, owner_pid: int | None = None) -> None:
    """Drop ``owner_pid``'s claim on ``item`` (dead owners are dropped on the next claim anyway)."""
    owner = owner_pid or os.getpid()
    path = _state_dir() / f"{pool}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            return
        claims = json.loads(path.read_text())
        claims[item] = [p for p in claims.get(item, []) if p != owner]
        path.write_text(json.dumps({k: v for k, v in claims.items() if v}))


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def claim_port(host: str, base_port: int, span: int = 512) -> int:
    """Claim a side-channel port in [base_port, base_port + span) that no live replica holds
    and that nothing else on the node is bound to."""
    cands = [str(p) for p in range(base_port, base_port + span) if port_is_free(host, p)]
    if not cands:
        raise RuntimeError(f"no free port in [{base_port}, {base_port + span}) on {host}")
    return int(claim("side_channel_ports", cands, prefer_least_used=False))


def claim_core(cores: list[int]) -> int:
    """Claim a CPU core for an engine; shares the least-used one when there are more engines."""
    return int(claim("cpu_cores", [str(c) for c in cores]))
