"""Chained block keys for prefix matching, and a reproduction of vLLM's engine block hash.

Two hash families exist side by side:

* **Our key** (`block_keys`): the routing index's own key for a full block of tokens. Key *i* is
  ``xxh3_64(token bytes of block i, seed=key i-1)``, with the chain's root seed derived from the
  LoRA name (0 without one). A key therefore identifies the whole prefix up to and including its
  block, like vLLM's hash, but costs ~0.2 µs a block instead of a pickle + SHA-256. Keys do not
  depend on any engine's hash seed or algorithm, so every tier and every engine agrees on them.
* **The engine's hash** (`engine_block_hashes`): what vLLM publishes in ``BlockStored`` /
  ``BlockRemoved`` events. The index only uses it to map removals back to our keys; this helper
  reproduces it for tests and debugging and imports vLLM lazily.

Only *full* blocks get keys: vLLM never caches a partial block.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

import xxhash

__all__ = ["ROOT_SEED", "block_keys", "engine_block_hashes", "lora_seed", "token_bytes"]

ROOT_SEED = 0
"""Seed of the first block of a chain without LoRA."""

_xxh3 = xxhash.xxh3_64_intdigest
_ITEMSIZE = 4
if array("I").itemsize != _ITEMSIZE:  # pragma: no cover - every supported platform has 4-byte "I"
    raise ImportError("scheduler.hashing needs a 4-byte array('I')")


def lora_seed(lora_name: str | None) -> int:
    """Root seed of a key chain for requests served with LoRA adapter ``lora_name``.

    Called by the ingress/router (once per request) and by the event decoder (once per
    ``BlockStored`` without a parent). Requests with different adapters never share keys.
    """
    if not lora_name:
        return ROOT_SEED
    return _xxh3(lora_name.encode("utf-8"))


def token_bytes(token_ids: Sequence[int] | bytes | memoryview) -> memoryview:
    """Token ids as little-endian uint32 bytes (the byte form `block_keys` hashes).

    Accepts a list/tuple of ints, an ``array('I')``, a numpy ``uint32`` array or raw bytes
    (already in this form). Raises ``OverflowError`` for ids outside ``[0, 2**32)``.
    """
    if isinstance(token_ids, bytes | bytearray | memoryview):
        return memoryview(token_ids).cast("B")
    if isinstance(token_ids, array) and token_ids.typecode == "I":
        return memoryview(token_ids).cast("B")
    dtype = getattr(token_ids, "dtype", None)
    if dtype is not None:  # numpy array, without importing numpy here
        return memoryview(token_ids.astype("<u4", copy=False).tobytes())  # type: ignore[union-attr,attr-defined]
    return memoryview(array("I", token_ids)).cast("B")


def block_keys(
    token_ids: Sequence[int] | bytes | memoryview,
    block_size: int,
    seed: int = ROOT_SEED,
    max_blocks: int | None = None,
) -> list[int]:
    """Chained 64-bit keys of the full blocks of ``token_ids``.

    Called once per request (the ingress or the first router) and reused by every tier; costs
    about 10 µs per 1k tokens. ``seed`` is the key of the block before ``token_ids[0]`` (or
    `lora_seed` for a chain that starts at the beginning of a prompt); the event decoder passes
    the parent's key to continue a chain. Trailing tokens that do not fill a block are ignored.

    Contract: ``block_keys(a + b, bs)[:len(a)//bs] == block_keys(a, bs)`` when ``len(a)`` is a
    multiple of ``bs``, and ``block_keys(b, bs, seed=block_keys(a, bs)[-1])`` continues the chain.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    data = token_bytes(token_ids)
    step = block_size * _ITEMSIZE
    n = len(data) // step
    if max_blocks is not None:
        n = min(n, max_blocks)
    keys: list[int] = []
    append = keys.append
    key = seed
    for start in range(0, n * step, step):
        key = _xxh3(data[start : start + step], key)
        append(key)
    return keys


def engine_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    hash_name: str = "sha256",
    extra_keys: Sequence[tuple[Any, ...] | None] | None = None,
    as_int: bool = True,
) -> list[int] | list[bytes]:
    """Reproduce the block hashes a vLLM 0.32 engine publishes for a prompt (full blocks only).

    For tests and debugging, never on the routing path: it imports vLLM (seconds) and costs a
    pickle + hash per block. Mirrors the engine: ``NONE_HASH`` from ``init_none_hash`` (it honours
    ``PYTHONHASHSEED`` exactly like the engine process does), ``hash_block_tokens`` chained from
    it, and with ``as_int`` (the engine default, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``) the
    published id: the low 64 bits of the digest read big-endian.
    """
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils

    hash_fn = get_hash_fn_by_name(hash_name)
    kv_cache_utils.init_none_hash(hash_fn)
    parent = None
    out: list[Any] = []
    for i in range(len(token_ids) // block_size):
        block = token_ids[i * block_size : (i + 1) * block_size]
        extra = extra_keys[i] if extra_keys is not None else None
        parent = kv_cache_utils.hash_block_tokens(hash_fn, parent, block, extra)
        out.append(int.from_bytes(parent, "big") & 0xFFFF_FFFF_FFFF_FFFF if as_int else parent)
    return out
