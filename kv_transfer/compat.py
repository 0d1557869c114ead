"""Up-front checks that the prefill and decode tiers can exchange KV.

NIXL finds a mismatch only at the first request's handshake (or, worse, moves blocks that
decode then misreads). pd_serve compares the tiers' layouts when the application is built and
refuses to start with a message that names the field to change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


class IncompatibleTiersError(ValueError):
    """The prefill and decode tiers cannot exchange KV blocks."""


@dataclass(frozen=True)
class EngineLayout:
    """What must agree between the tiers for their KV blocks to be interchangeable."""

    model: str
    dtype: str
    block_size: int
    kv_cache_dtype: str = "auto"
    num_kv_heads: int | None = None
    head_dim: int | None = None
    num_layers: int | None = None
    tensor_parallel_size: int = 1
    use_mla: bool = False  # MLA keeps one latent KV per token, replicated on every TP rank


_HINT = {
    "model": "both tiers must load the same model from the same path string "
             "(NIXL's handshake hashes it)",
    "dtype": "set the same `dtype` in both tiers' engine_args",
    "block_size": "set the same `block_size` in both tiers' engine_args (the KV block layout)",
    "kv_cache_dtype": "set the same `kv_cache_dtype` on both tiers",
    "num_kv_heads": "the tiers load models with different KV head counts",
    "head_dim": "the tiers load models with different head dimensions",
    "num_layers": "the tiers load models with different layer counts",
}


def check_compatible(prefill: EngineLayout, decode: EngineLayout,
                     *, heterogeneous_tp: bool = True) -> None:
    """Raise IncompatibleTiersError naming the first field that differs.

    ``heterogeneous_tp``: whether the connector maps between different TP sizes (NIXL does,
    when the larger TP is a multiple of the smaller and KV heads divide evenly).
    """
    for f in fields(EngineLayout):
        a, b = getattr(prefill, f.name), getattr(decode, f.name)
        if f.name in ("tensor_parallel_size", "use_mla"):
            continue
        if a is not None and b is not None and a != b:
            raise IncompatibleTiersError(
                f"P/D tiers disagree on {f.name}: prefill={a!r}, decode={b!r}: {_HINT[f.name]}")
    tp_p, tp_d = prefill.tensor_parallel_size, decode.tensor_parallel_size
    if tp_p != tp_d:
        if not heterogeneous_tp:
            raise IncompatibleTiersError(
                f"P/D tiers disagree on tensor_parallel_size: prefill={tp_p}, decode={tp_d}, "
                "and this connector needs equal TP")
        hi, lo = max(tp_p, tp_d), min(tp_p, tp_d)
        if hi % lo:
            raise IncompatibleTiersError(
                f"tensor_parallel_size prefill={tp_p}, decode={tp_d}: the larger must be a "
                "multiple of the smaller for NIXL's heterogeneous-TP mapping")
        heads = prefill.num_kv_heads
        if heads is not None and heads >= hi and heads % hi:
            raise IncompatibleTiersError(
                f"num_kv_heads={heads} does not divide evenly over tensor_parallel_size={hi}")
        if heads is not None and not prefill.use_mla and tp_p > tp_d and tp_p > heads:
            # vLLM 0.32, nixl/base_worker.py (decode's handshake with prefill): with remote (prefill)
            # TP above local (decode) TP, prefill's KV must not be replicated across its ranks,
            # i.e. prefill TP <= the model's KV heads (kv_connector/utils.py, is_kv_replicated).
            raise IncompatibleTiersError(
                f"tensor_parallel_size prefill={tp_p} > decode={tp_d} needs prefill TP <= the model's "
                f"{heads} KV heads (vLLM's NIXL connector cannot read KV that prefill replicates "
                f"across ranks): set prefill.tensor_parallel_size to at most {heads}, or decode's to "
                f"at least {tp_p}")
