"""How KV moves between the prefill and decode tiers.

Pure Python at import time: no Ray, no FastAPI, no vLLM. vLLM's own connectors move the
bytes; this package owns what surrounds them:

- ``backends``: connector backends by name (NIXL first) -> each tier's and replica's vLLM
  ``kv_transfer_config`` and environment;
- ``ports``: node-local allocation of side-channel ports and CPU cores;
- ``params``: the typed ``kv_transfer_params`` hand-off between tiers;
- ``compat``: up-front compatibility checks between tiers;
- ``cpu_plugin``: the documented vLLM plugin that tames NIXL on CPU-only hosts;
- ``held``: the count of blocks a prefill engine holds until decode pulls them (a gauge vLLM
  lacks), observed in the engine process and read by the replica;
- ``metrics``: backend-neutral transfer metrics derived from the connector's own.
"""

from kv_transfer.backends import (
    BACKENDS,
    ConnectorBackend,
    ExampleStorageBackend,
    NixlBackend,
    ReplicaTransferIdentity,
    UnknownBackendError,
    get_backend,
)
from kv_transfer.compat import EngineLayout, IncompatibleTiersError, check_compatible
from kv_transfer.params import KVTransferParams, prefill_request_params

__all__ = [
    "BACKENDS",
    "ConnectorBackend",
    "EngineLayout",
    "ExampleStorageBackend",
    "IncompatibleTiersError",
    "KVTransferParams",
    "NixlBackend",
    "ReplicaTransferIdentity",
    "UnknownBackendError",
    "check_compatible",
    "get_backend",
    "prefill_request_params",
]
