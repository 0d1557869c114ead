"""PrefillRate: the prefill rate a queue drains at, from busy time, not per-request time."""

from __future__ import annotations

import pytest

from pd_serve.engine import PrefillRate


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_none_until_a_window_closes_then_tokens_over_busy_time():
    c = Clock()
    r = PrefillRate(clock=c, min_tokens=1000, min_busy_s=0.05)
    assert r.update(0) is None                      # opens the window
    r.enter(); c.t += 0.5; r.exit()                 # 0.5 s busy
    c.t += 10.0                                     # idle time must not count
    assert r.update(500) is None                    # too few tokens yet: window stays open
    r.enter(); c.t += 0.5; r.exit()
    assert r.update(2000) == pytest.approx(2000 / 1.0)


def test_batched_prefills_count_the_step_once():
    """Two prompts prefilled together for 1 s: the engine did 2x the tokens in 1 s of busy
    time. A per-request average (tokens_i / time_i) would halve the rate."""
    c = Clock()
    r = PrefillRate(clock=c, min_tokens=1, min_busy_s=0.01)
    r.update(0)
    r.enter(); r.enter(); c.t += 1.0; r.exit(); r.exit()
    assert r.update(4000) == pytest.approx(4000.0)


def test_open_interval_counts_and_average_moves_by_alpha():
    c = Clock()
    r = PrefillRate(clock=c, min_tokens=1, min_busy_s=0.01, alpha=0.5)
    r.update(0)
    r.enter(); c.t += 1.0
    assert r.update(1000) == pytest.approx(1000.0)  # still in flight: the open interval counts
    c.t += 1.0; r.exit()
    assert r.update(4000) == pytest.approx(0.5 * 1000 + 0.5 * 3000)


def test_counter_reset_restarts_the_window():
    c = Clock()
    r = PrefillRate(clock=c, min_tokens=1, min_busy_s=0.01)
    r.update(5000)
    r.enter(); c.t += 1.0; r.exit()
    assert r.update(100) is None    # the counter went backwards: new window, no bogus rate
    r.enter(); c.t += 1.0; r.exit()
    assert r.update(2100) == pytest.approx(2000.0)
