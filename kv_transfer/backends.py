"""Connector backends: one app-level choice -> per-tier, per-replica vLLM settings.

A backend is chosen by name in the app config (``kv_transfer.backend``). It turns that choice
into what each engine needs: the ``kv_transfer_config`` dict that vLLM's ``KVTransferConfig``
accepts, and the environment variables the connector reads (side-channel host/port, UCX).

Unknown names and missing packages fail at start-up (``UnknownBackendError`` /
``ImportError`` with the install command); there is no silent fallback to another backend.
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Role = Literal["producer", "consumer", "both"]
_VLLM_ROLE = {"producer": "kv_producer", "consumer": "kv_consumer", "both": "kv_both"}


class UnknownBackendError(ValueError):
    """The configured backend name is not one of ``BACKENDS``."""


@dataclass(frozen=True)
class ReplicaTransferIdentity:
    """Who this engine is on the transfer plane. Built once per replica at start-up."""

    tier: Literal["prefill", "decode"]
    engine_id: str
    side_channel_host: str
    side_channel_port: int


@dataclass
class ConnectorBackend(ABC):
    """Turns the app's KV-transfer choice into engine settings.

    ``engine_config`` and ``engine_env`` are called once per replica, before its engine starts,
    and must be side-effect free. ``check_available`` is called once at application build.
    """

    buffer_device: str = "cpu"
    extra_config: dict[str, Any] = field(default_factory=dict)

    name: ClassVar[str]
    vllm_connector: ClassVar[str]
    required_modules: ClassVar[tuple[tuple[str, str], ...]] = ()  # (import name, pip hint)

    def check_available(self) -> None:
        """Raise ImportError naming the package to install when a required module is absent."""
        for module, hint in self.required_modules:
            if importlib.util.find_spec(module) is None:
                raise ImportError(
                    f"kv_transfer backend {self.name!r} needs the python module {module!r}: {hint}")

    def engine_config(self, role: Role, ident: ReplicaTransferIdentity) -> dict[str, Any]:
        """vLLM ``kv_transfer_config`` for one engine."""
        return {
            "kv_connector": self.vllm_connector,
            "kv_role": _VLLM_ROLE[role],
            "kv_buffer_device": self.buffer_device,
            "engine_id": ident.engine_id,
            "kv_connector_extra_config": dict(self.extra_config),
        }

    @abstractmethod
    def engine_env(self, ident: ReplicaTransferIdentity) -> dict[str, str]:
        """Environment variables the engine process needs (set before the engine starts)."""


@dataclass
class NixlBackend(ConnectorBackend):
    """vLLM's ``NixlConnector``: decode pulls prefill's blocks over UCX (RDMA, shm or TCP).

    Each engine gets its own side channel (host, port) on which peers fetch its NIXL metadata.
    ``UCX_TLS`` keeps ``tcp`` in the list: without it NIXL's error handling fails with
    "no peer failure handler" on hosts without RDMA.
    """

    name: ClassVar[str] = "nixl"
    vllm_connector: ClassVar[str] = "NixlConnector"
    required_modules: ClassVar[tuple[tuple[str, str], ...]] = (
        ("nixl", "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1 (see requirements/nixl.txt)"),
    )
    ucx_tls: str | None = None

    def engine_env(self, ident: ReplicaTransferIdentity) -> dict[str, str]:
        env = {
            "VLLM_NIXL_SIDE_CHANNEL_HOST": ident.side_channel_host,
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(ident.side_channel_port),
        }
        if self.ucx_tls:
            env["UCX_TLS"] = self.ucx_tls
        return env


@dataclass
class ExampleStorageBackend(ConnectorBackend):
    """vLLM's ``ExampleConnector``: full blocks through files in a shared folder. For debugging.

    ``extra_config.shared_storage_path`` is the folder; both tiers must see the same one.
    """

    name: ClassVar[str] = "example_storage"
    vllm_connector: ClassVar[str] = "ExampleConnector"

    def __post_init__(self) -> None:
        self.extra_config.setdefault(
            "shared_storage_path", os.path.join(os.environ.get("TMPDIR", "/tmp"), "pd_serve_kv"))

    def engine_env(self, ident: ReplicaTransferIdentity) -> dict[str, str]:
        return {}


BACKENDS: dict[str, type[ConnectorBackend]] = {
    NixlBackend.name: NixlBackend,
    ExampleStorageBackend.name: ExampleStorageBackend,
}


def get_backend(name: str, **kwargs: Any) -> ConnectorBackend:
    """Instantiate the backend called ``name``; raise ``UnknownBackendError`` otherwise."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(
            f"unknown kv_transfer backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    return cls(**kwargs)
