from __future__ import annotations

import subprocess
import sys

HEAVY = ("ray", "fastapi", "vllm", "torch", "zmq", "prometheus_client")


def test_importing_scheduler_stays_light() -> None:
    code = (
        "import sys, pkgutil, importlib, scheduler\n"
        "for m in pkgutil.walk_packages(scheduler.__path__, 'scheduler.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_check_itself_detects_a_heavy_import() -> None:
    code = "import sys, scheduler, zmq\nprint('zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
