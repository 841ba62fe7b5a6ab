"""The README's demo runs end to end (quick mode): the recipe's stage table and the reload check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_quick_runs(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dense model test accuracy" in out.stdout
    for stage in ("01-prune_structured", "02-prune", "03-finetune", "04-quantize", "05-save"):
        assert stage in out.stdout
    assert "outputs on all 450 test images are identical" in out.stdout.replace("\n", " ")
    assert (tmp_path / "run" / "report.html").is_file()
