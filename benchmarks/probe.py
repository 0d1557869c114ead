"""Time GETs of one URL at a fixed interval, from a process of its own.

    python -m benchmarks.probe URL INTERVAL_S TIMEOUT_S   # until stdin closes; then one JSON line

Used by ``serving_bench`` for ``/health``: a probe thread inside the benchmark's driver shares
its GIL with the driver's own work (parsing each ``/metrics`` scrape, sampling per-process CPU),
so its latencies include the driver's pauses, not only the server's. This process does nothing
else. Prints ``{"ms": [...], "failed": n, "errors": {status or exception: count}}`` on exit.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx


def main(argv: list[str]) -> int:
    url, interval, timeout = argv[0], float(argv[1]), float(argv[2])
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    ms: list[float] = []
    failed, errors = 0, {}
    with httpx.Client(timeout=timeout) as c:
        nxt = time.monotonic()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                resp = c.get(url)
                ok, why = resp.status_code == 200, str(resp.status_code)
            except httpx.HTTPError as e:
                ok, why = False, type(e).__name__
            ms.append(1000 * (time.perf_counter() - t0))
            if not ok:
                failed += 1
                errors[why] = errors.get(why, 0) + 1
            nxt = max(nxt + interval, time.monotonic())
            stop.wait(max(0.0, nxt - time.monotonic()))
    print(json.dumps({"ms": ms, "failed": failed, "errors": errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
