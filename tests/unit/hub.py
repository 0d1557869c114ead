"""A stand-in for the Hugging Face hub in unit tests: no network, one seam.

``pd_serve.model_source.read_hf_config`` fetches a hub model's config.json with
``huggingface_hub.hf_hub_download``; ``stub_hub`` replaces that one function. It serves the files
given and raises the given exception otherwise, and records what was asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# meta-llama/Llama-3.1-70B-Instruct's config.json, the fields the KV-layout checks read:
# 64 query heads, 8 KV heads (GQA), head_dim 8192 / 64 = 128, 80 layers.
LLAMA_70B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
    "num_hidden_layers": 80, "vocab_size": 128256, "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def stub_hub(monkeypatch, tmp_path: Path, repos: dict[str, dict[str, Any]] | None = None,
             error: BaseException | None = None) -> list[tuple[str, str, str | None]]:
    """Serve ``repos[repo_id]`` as that repo's config.json; raise ``error`` for anything else
    (default: the repo is unknown). Returns the list of (repo, filename, revision) asked for."""
    import huggingface_hub

    calls: list[tuple[str, str, str | None]] = []

    def fake_download(repo_id: str, filename: str, *, revision: str | None = None, **_: Any) -> str:
        calls.append((repo_id, filename, revision))
        if error is not None:
            raise error
        if repos is None or repo_id not in repos or filename != "config.json":
            raise AssertionError(f"unexpected hub download {repo_id}/{filename}")
        path = tmp_path / "hub" / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(repos[repo_id]))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return calls
