"""pd_serve's log records reach Serve's replica handlers (pd_serve.logs)."""

from __future__ import annotations

import logging

import pytest

from pd_serve import logs


@pytest.fixture
def clean(monkeypatch):
    ours, serve = logging.getLogger("pd_serve"), logging.getLogger("ray.serve")
    saved = (list(ours.handlers), ours.level, ours.propagate, list(serve.handlers))
    monkeypatch.setattr(logs, "_done", False)
    yield ours, serve
    ours.handlers[:], ours.level, ours.propagate = saved[0], saved[1], saved[2]
    serve.handlers[:] = saved[3]


class Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_outside_a_replica_nothing_changes(clean):
    ours, serve = clean
    serve.handlers[:] = []
    assert logs.to_serve_log() is False
    assert not ours.handlers


def test_in_a_replica_info_lines_reach_serves_handlers_once(clean):
    ours, serve = clean
    keep = Keep()
    serve.handlers[:] = [keep]
    assert logs.to_serve_log() and logs.to_serve_log()
    logging.getLogger("pd_serve.servers").info("prefill tier woke up")
    logging.getLogger("pd_serve.servers").debug("not at INFO")
    assert [r.getMessage() for r in keep.records] == ["prefill tier woke up"]
    assert len(ours.handlers) == 1 and ours.propagate is False
    # Serve replaces its handlers later: the records follow
    later = Keep()
    serve.handlers[:] = [later]
    logging.getLogger("pd_serve.engine").warning("after the swap")
    assert [r.getMessage() for r in later.records] == ["after the swap"]
