"""The README's demo runs end to end (quick mode) and prints its results table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_quick_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(DEMO), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dense model test accuracy" in out.stdout
    assert "unstructured global 90%" in out.stdout and "2:4" in out.stdout
    assert "outputs on all 450 test images are identical" in out.stdout.replace("\n", " ")
