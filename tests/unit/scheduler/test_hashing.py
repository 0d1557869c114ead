from __future__ import annotations

import hashlib
import pickle
from array import array

import numpy as np
import pytest

from scheduler.hashing import block_keys, engine_block_hashes, lora_seed

from .conftest import tokens


def test_only_full_blocks_get_keys() -> None:
    toks = tokens(1, 10)
    assert len(block_keys(toks, 4)) == 2
    assert block_keys(toks, 4) == block_keys(toks[:8], 4)
    assert block_keys(toks[:3], 4) == []


def test_keys_chain_over_the_whole_prefix() -> None:
    a, b = tokens(1, 8), tokens(2, 8)
    ka = block_keys(a + b, 4)
    # same second-half tokens after a different first half: different keys
    kb = block_keys(b + b, 4)
    assert ka[2:] != kb[2:]
    # a chain continues from the parent's key
    assert block_keys(b, 4, seed=block_keys(a, 4)[-1]) == ka[2:]
    assert len(set(ka)) == 4


def test_input_forms_agree() -> None:
    toks = tokens(3, 64)
    expected = block_keys(toks, 16)
    assert block_keys(tuple(toks), 16) == expected
    assert block_keys(array("I", toks), 16) == expected
    assert block_keys(np.array(toks, dtype=np.int64), 16) == expected
    assert block_keys(array("I", toks).tobytes(), 16) == expected
    assert block_keys(toks, 16, max_blocks=2) == expected[:2]


def test_lora_separates_chains() -> None:
    toks = tokens(4, 8)
    assert lora_seed(None) == lora_seed("") == 0
    assert block_keys(toks, 4, lora_seed("a")) != block_keys(toks, 4)
    assert block_keys(toks, 4, lora_seed("a")) != block_keys(toks, 4, lora_seed("b"))


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        block_keys([1, 2], 0)
    with pytest.raises(OverflowError):
        block_keys([-1, 2, 3, 4], 4)


def _sha256_pickle(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


@pytest.mark.parametrize("n_tokens,block_size", [(70, 32), (257, 16)])
def test_engine_hash_matches_vllm(monkeypatch: pytest.MonkeyPatch, n_tokens: int, block_size: int) -> None:
    """`engine_block_hashes` equals what a vLLM Request hashes and publishes (and a from-scratch
    sha256(pickle) chain, which pins the algorithm documented in PLATFORM.md)."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")
    toks = tokens(n_tokens, n_tokens)
    ours = engine_block_hashes(toks, block_size)

    hash_fn = get_hash_fn_by_name("sha256")
    kv_cache_utils.init_none_hash(hash_fn)
    req = Request(
        "r",
        toks,
        SamplingParams(max_tokens=1),
        None,
        block_hasher=kv_cache_utils.get_request_block_hasher(block_size, hash_fn),
    )
    published = [kv_cache_utils.maybe_convert_block_hash(h) for h in req.block_hashes]
    assert len(ours) == n_tokens // block_size
    assert ours == published

    parent = _sha256_pickle("vllm-none-hash")
    scratch = []
    for i in range(n_tokens // block_size):
        parent = _sha256_pickle((parent, tuple(toks[i * block_size : (i + 1) * block_size]), None))
        scratch.append(int.from_bytes(parent[-8:], "big"))
    assert ours == scratch
    assert engine_block_hashes(toks, block_size, as_int=False) == list(req.block_hashes)
