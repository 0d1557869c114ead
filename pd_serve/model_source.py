"""Where the model's weights come from, and its ``config.json`` read from there.

``model`` in the app config is either a local directory (``tiny://…``, an absolute or relative
path: a volume mounted on every node) or a Hugging Face hub id (``org/name``). The two differ in
what every replica needs:

- a local model runs with ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``, so nothing ever
  reaches for the network;
- a hub id needs the network and, for gated models such as Llama, an ``HF_TOKEN`` (the KubeRay
  manifest takes it from a Kubernetes secret), so offline mode must stay off.

``read_hf_config`` is called once at application build (``pd_serve.app``), so that the KV-layout
checks between the tiers (``kv_transfer.compat``) run for hub ids too. It downloads
``config.json`` alone (a few KB), never the weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pd_serve.tiny_model import resolve_model

logger = logging.getLogger(__name__)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class ModelSourceError(ValueError):
    """``model`` cannot be served as configured: the message says what to change."""


def is_local_model(model: str) -> bool:
    """True for ``tiny://…`` and for filesystem paths; False for hub ids.

    A hub id is ``name`` or ``org/name``: never absolute, never ``./`` or ``~``. A bare relative
    name that exists as a directory here is local too (vLLM makes the same choice: a directory
    wins over the hub)."""
    if model.startswith("tiny://"):
        return True
    if model.startswith(("/", "./", "../", "~")):
        return True
    return Path(model).is_dir()


def offline_env(model: str) -> dict[str, str]:
    """Offline-mode variables for replicas and the ingress: only where the model is local."""
    return dict(OFFLINE_ENV) if is_local_model(model) else {}


def read_hf_config(model: str, *, revision: str | None = None) -> dict[str, Any] | None:
    """The model's ``config.json`` (``text_config`` of multimodal models), wherever it lives.

    - Local directory: read from disk. Missing: ``ModelSourceError`` (the engines would fail too).
    - Hub id: downloaded with ``huggingface_hub`` (it reads ``HF_TOKEN`` and the local cache).
      A missing, gated or unauthorised repo, revision or file is a ``ModelSourceError``: the
      engines and the ingress tokenizer would fail the same way, later. When the hub cannot be
      reached at all from the node that builds the app, this returns ``None`` and logs a
      WARNING that the checks are skipped: the engines may still find the model in a cache
      that this node lacks.
    """
    if is_local_model(model):
        path = Path(resolve_model(model)).expanduser() / "config.json"
        if not path.is_file():
            raise ModelSourceError(
                f"model: {model!r} is a local path but {path} does not exist on the node that builds "
                "the app. Mount the weights volume on every node, head included (the KubeRay "
                "generator does: `--model-pvc`), or set `model` to a hub id such as "
                "meta-llama/Llama-3.1-70B-Instruct.")
        return _text_config(json.loads(path.read_text()))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token_hint = ("HF_TOKEN is set but has no access to it: accept the model's licence on the hub "
                  "with that account" if os.environ.get("HF_TOKEN") else
                  "HF_TOKEN is not set: give the token of an account with access (the KubeRay "
                  "manifest reads it from the secret named by `--hf-token-secret`)")
    try:
        path = hf_hub_download(model, "config.json", revision=revision)
    except GatedRepoError as e:
        raise ModelSourceError(f"model: {model!r} is gated on the Hugging Face hub and {token_hint}") from e
    except RepositoryNotFoundError as e:
        raise ModelSourceError(
            f"model: {model!r} is neither a local directory nor a hub repo this token can see "
            f"({token_hint}). Fix the id, or set `model` to the weights' directory") from e
    except RevisionNotFoundError as e:
        raise ModelSourceError(f"engine_args.revision {revision!r} does not exist in {model!r}") from e
    except LocalEntryNotFoundError as e:  # no network (or offline mode) and nothing cached
        logger.warning(
            "KV-layout checks between the tiers skipped: config.json of %r could not be fetched "
            "from the hub on this node (%s). The engines will download it themselves; a "
            "mismatch would then show only at the first KV transfer.", model, e)
        return None
    except EntryNotFoundError as e:
        raise ModelSourceError(f"model: {model!r} has no config.json on the hub: not a transformers model") from e
    except HfHubHTTPError as e:  # 5xx and the like: the hub, not the config, is at fault
        logger.warning("KV-layout checks between the tiers skipped: the hub answered %s for %r's "
                       "config.json.", e, model)
        return None
    return _text_config(json.loads(Path(path).read_text()))


def _text_config(hf: dict[str, Any]) -> dict[str, Any]:
    return hf.get("text_config", hf)


__all__ = ["OFFLINE_ENV", "ModelSourceError", "is_local_model", "offline_env", "read_hf_config"]
