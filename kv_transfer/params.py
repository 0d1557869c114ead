"""The typed ``kv_transfer_params`` hand-off between prefill and decode.

vLLM passes these as a plain dict on the OpenAI request (``kv_transfer_params``) and answers
with one on the prefill response. pd_serve converts at the boundary so that everything in
between is a checked struct; ``to_vllm`` gives back exactly the dict vLLM expects.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec


class KVTransferParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What prefill's NIXL connector returns for decode to pull the blocks."""

    do_remote_prefill: bool = True
    do_remote_decode: bool = False
    remote_engine_id: str | None = None
    remote_block_ids: list[Any] | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_num_tokens: int | None = None
    # Fields newer vLLM versions add (transfer_mode, tp_size, request ids, ...) travel unchanged.
    extra: dict[str, Any] = {}

    _KNOWN: ClassVar[frozenset[str]] = frozenset({"do_remote_prefill", "do_remote_decode", "remote_engine_id",
                        "remote_block_ids", "remote_host", "remote_port", "remote_num_tokens"})

    @classmethod
    def from_vllm(cls, raw: dict[str, Any] | None) -> "KVTransferParams":
        """Parse prefill's answer. Raises ValueError when it does not describe a pull."""
        if not raw:
            raise ValueError("prefill returned no kv_transfer_params (is its connector a kv_producer?)")
        known = {k: raw[k] for k in cls._KNOWN if k in raw}
        extra = {k: v for k, v in raw.items() if k not in cls._KNOWN}
        p = msgspec.convert(known, cls)
        p = msgspec.structs.replace(p, extra=extra)
        if p.do_remote_prefill and (p.remote_engine_id is None or p.remote_block_ids is None):
            raise ValueError(f"prefill kv_transfer_params lack engine id or block ids: {raw}")
        return p

    def to_vllm(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._KNOWN}
        out.update(self.extra)
        return out

    @property
    def num_blocks(self) -> int:
        ids = self.remote_block_ids or []
        if ids and isinstance(ids[0], list):
            return sum(len(group) for group in ids)
        return len(ids)


def prefill_request_params() -> dict[str, Any]:
    """``kv_transfer_params`` that turn a request into a prefill-for-remote-decode request."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
