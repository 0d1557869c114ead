from __future__ import annotations

import pytest

from scheduler import PrefixIndex, block_keys, lora_seed

from .conftest import BLOCK, FakeClock, fake_engine_hashes, store_prefix, tokens


@pytest.fixture
def index(clock: FakeClock) -> PrefixIndex:
    return PrefixIndex(BLOCK, clock=clock)


def test_stored_blocks_match_longest_prefix(index: PrefixIndex) -> None:
    toks = tokens(1, 24)  # 6 blocks
    store_prefix(index, "a", toks[:16])  # 4 blocks
    store_prefix(index, "b", toks[:8])  # 2 blocks
    keys = block_keys(toks, BLOCK)
    assert index.match(keys) == {"a": 4, "b": 2}
    assert index.match(block_keys(tokens(2, 24), BLOCK)) == {}
    groups = index.match_groups(keys)
    assert [n for _, n in groups] == [2, 4]
    assert groups[1][0] & ~groups[0][0] == 0  # nested masks


def test_chained_event_uses_parent_key(index: PrefixIndex) -> None:
    toks = tokens(1, 16)
    h = fake_engine_hashes("a", toks)
    index.apply_stored("a", h[:2], None, toks[:8], BLOCK)
    index.apply_stored("a", h[2:], h[1], toks[8:], BLOCK)
    assert index.match(block_keys(toks, BLOCK)) == {"a": 4}


def test_orphan_and_malformed_events_are_counted_not_applied(index: PrefixIndex) -> None:
    toks = tokens(1, 8)
    assert index.apply_stored("a", [11, 12], 999, toks, BLOCK) == 0
    assert index.stats.orphan_blocks == 2
    assert index.apply_stored("a", [11, 12], None, toks, 8) == 0
    assert index.stats.block_size_mismatch == 1
    assert index.apply_stored("a", [11], None, toks, BLOCK) == 0
    assert index.stats.misaligned_events == 1
    assert len(index) == 0


def test_consecutive_prefix_stops_at_a_hole(index: PrefixIndex) -> None:
    toks = tokens(1, 16)
    hashes = store_prefix(index, "a", toks)
    index.apply_removed("a", [hashes[1]])
    assert index.match(block_keys(toks, BLOCK)) == {"a": 1}


def test_removed_and_cleared(index: PrefixIndex) -> None:
    toks = tokens(1, 16)
    ha = store_prefix(index, "a", toks)
    store_prefix(index, "b", toks)
    keys = block_keys(toks, BLOCK)
    assert index.apply_removed("a", ha[2:]) == 2
    assert index.match(keys) == {"a": 2, "b": 4}
    index.apply_removed("a", [12345])
    assert index.stats.unknown_removals == 1
    index.apply_cleared("b")
    assert index.match(keys) == {"a": 2}
    assert index.keys_of("b") == set()


def test_restore_is_idempotent_and_media_are_tracked(index: PrefixIndex) -> None:
    toks = tokens(1, 8)
    h = fake_engine_hashes("a", toks)
    index.apply_stored("a", h, None, toks, BLOCK, medium="GPU")
    index.apply_stored("a", h, None, toks, BLOCK, medium="GPU")  # vLLM "full" reuse report
    index.apply_stored("a", h, None, toks, BLOCK, medium="CPU")  # offloaded copy
    keys = block_keys(toks, BLOCK)
    index.apply_removed("a", h, medium="GPU")
    assert index.match(keys) == {"a": 2}  # the CPU copy still serves hits
    index.apply_removed("a", h, medium="GPU")  # not held on GPU any more
    assert index.stats.unknown_removals == 2
    assert index.match(keys) == {"a": 2}
    index.apply_removed("a", h, medium="CPU")
    assert index.match(keys) == {}


def test_lora_events_use_lora_chain(index: PrefixIndex) -> None:
    toks = tokens(1, 8)
    index.apply_stored("a", [1, 2], None, toks, BLOCK, lora_name="sql")
    assert index.match(block_keys(toks, BLOCK)) == {}
    assert index.match(block_keys(toks, BLOCK, lora_seed("sql"))) == {"a": 2}


def test_group_filter(clock: FakeClock) -> None:
    index = PrefixIndex(BLOCK, clock=clock, groups={0})
    toks = tokens(1, 8)
    index.apply_stored("a", [1, 2], None, toks, BLOCK, group_idx=1)
    assert len(index) == 0
    index.apply_stored("a", [1, 2], None, toks, BLOCK, group_idx=0)
    index.apply_removed("a", [1, 2], group_idx=1)
    assert index.match(block_keys(toks, BLOCK)) == {"a": 2}


def test_remove_worker_frees_bit_without_leaking_keys(index: PrefixIndex) -> None:
    toks = tokens(1, 8)
    store_prefix(index, "a", toks)
    store_prefix(index, "b", toks)
    bit_a = index.bit_of("a")
    version = index.membership_version
    index.remove_worker("a")
    assert index.membership_version > version
    assert index.bit_of("a") is None
    assert index.match(block_keys(toks, BLOCK)) == {"b": 2}
    index.add_worker("c")  # reuses a's bit: must not inherit a's keys
    assert index.bit_of("c") == bit_a
    assert index.match(block_keys(toks, BLOCK)) == {"b": 2}
    index.remove_worker("b")
    assert len(index) == 0
    index.remove_worker("b")  # idempotent


def test_speculative_entries_expire(index: PrefixIndex, clock: FakeClock) -> None:
    keys = block_keys(tokens(1, 16), BLOCK)
    index.record_routed("a", keys, ttl_s=10)
    assert index.match(keys) == {"a": 4}
    clock.advance(5)
    index.record_routed("a", keys[:2], ttl_s=10)  # refresh the first two
    clock.advance(6)
    assert index.match(keys) == {"a": 2}
    clock.advance(5)
    assert index.match(keys) == {}
    assert index.stats.speculative_expired == 4
    assert len(index) == 0


def test_speculative_capacity_is_lru(index: PrefixIndex) -> None:
    k1 = block_keys(tokens(1, 12), BLOCK)
    k2 = block_keys(tokens(2, 12), BLOCK)
    index.set_capacity("a", 4)
    index.record_routed("a", k1, ttl_s=100)
    index.record_routed("a", k2, ttl_s=100)  # evicts the 2 oldest keys of k1
    assert index.match(k2) == {"a": 3}
    assert index.match(k1) == {}  # k1's first blocks are gone: no prefix left
    assert index.keys_of("a") == {k1[2], *k2}
    assert index.stats.speculative_evicted == 2
    index.record_routed("b", k1, ttl_s=100, capacity=1)
    assert index.keys_of("b") == {k1[2]}


def test_event_confirms_speculative_entry(index: PrefixIndex, clock: FakeClock) -> None:
    toks = tokens(1, 8)
    keys = block_keys(toks, BLOCK)
    index.record_routed("a", keys, ttl_s=1)
    store_prefix(index, "a", toks)
    clock.advance(5)
    assert index.match(keys) == {"a": 2}  # confirmed: no longer subject to the TTL
    index.record_routed("a", keys, ttl_s=1)  # confirmed keys are not re-speculated
    assert index.stats.speculative_inserted == 2


def test_removal_wins_over_stale_speculation(index: PrefixIndex, clock: FakeClock) -> None:
    toks = tokens(1, 8)
    hashes = store_prefix(index, "a", toks)
    index.apply_removed("a", hashes)
    assert index.match(block_keys(toks, BLOCK)) == {}


def test_speculation_keeps_other_workers_bits(index: PrefixIndex) -> None:
    toks = tokens(1, 16)
    store_prefix(index, "a", toks[:8])
    index.record_routed("b", block_keys(toks, BLOCK), ttl_s=10)
    index.record_routed("c", block_keys(toks, BLOCK)[:1], ttl_s=10)
    assert index.match(block_keys(toks, BLOCK)) == {"a": 2, "b": 4, "c": 1}
    index.remove_worker("b")
    assert index.match(block_keys(toks, BLOCK)) == {"a": 2, "c": 1}


def test_expiry_is_collected_by_recording_or_after_slack(clock: FakeClock) -> None:
    index = PrefixIndex(BLOCK, clock=clock, expiry_slack_s=1.0)
    keys = block_keys(tokens(1, 8), BLOCK)
    other = block_keys(tokens(2, 8), BLOCK)
    index.record_routed("a", keys, ttl_s=2)
    clock.advance(2.5)
    assert index.match(keys) == {"a": 2}  # overdue by less than the slack: not collected yet
    index.record_routed("b", other, ttl_s=2)  # recording collects it
    assert index.match(keys) == {}
    clock.advance(3.5)
    assert index.match(other) == {}  # overdue by more than the slack
    assert index.stats.speculative_expired == 4


def test_two_engine_hashes_for_one_key_are_counted(index: PrefixIndex) -> None:
    """E.g. two cache salts over the same tokens: our key is held while either copy is."""
    toks = tokens(1, 8)
    keys = block_keys(toks, BLOCK)
    index.apply_stored("a", [1, 2], None, toks, BLOCK)
    index.apply_stored("a", [3, 4], None, toks, BLOCK)
    assert index.apply_removed("a", [1, 2]) == 0
    assert index.match(keys) == {"a": 2}
    assert index.apply_removed("a", [3, 3, 4]) == 2  # a repeated hash is applied once
    assert index.stats.unknown_removals == 1
    assert index.match(keys) == {}
    index.apply_stored("a", [5, 6], None, toks, BLOCK)
    index.apply_stored("a", [6, 7], None, toks[:4] + toks[:4], BLOCK)  # 6 known: slow path
    index.apply_removed("a", [5, 6, 7])
    assert index.keys_of("a") == set() and len(index) == 0
