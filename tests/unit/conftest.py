"""Unit tests: no Ray cluster, no engine. Shared builders live here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def config_args(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / name).read_text())["applications"][0]["args"]


@pytest.fixture
def tiny_args() -> dict[str, Any]:
    return config_args("tiny-cpu.yaml")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PD_SERVE_RUN_DIR", str(tmp_path))
    return tmp_path
