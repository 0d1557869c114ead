"""pd_serve's log lines inside Serve replicas.

Ray Serve gives each replica a configured ``ray.serve`` logger (the replica's log file under
``logs/serve/`` and stderr, which ``serve run`` shows); any other logger propagates to a root
logger with no handler there, so pd_serve's INFO lines (an engine up, the prefill tier woken, a
replica stopping) went nowhere. ``to_serve_log()`` gives the ``pd_serve`` logger Serve's
handlers, once per process; outside a replica (no handler on ``ray.serve``) it does nothing.
"""

from __future__ import annotations

import logging

_done = False


class _ToServe(logging.Handler):
    """Hands each record to the ``ray.serve`` logger's handlers as they are at that moment
    (Serve may replace them after a replica starts, so copying them once is not enough)."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_log = logging.getLogger("ray.serve")
        if serve_log.handlers:
            serve_log.handle(record)


def to_serve_log(level: int = logging.INFO) -> bool:
    """Route ``pd_serve.*`` records to the ``ray.serve`` logger's handlers. Returns whether it did."""
    global _done
    if _done:
        return True
    if not logging.getLogger("ray.serve").handlers:
        return False
    ours = logging.getLogger("pd_serve")
    ours.addHandler(_ToServe())
    ours.setLevel(level)
    ours.propagate = False  # the root logger would print it a second time where it has a handler
    _done = True
    return True
