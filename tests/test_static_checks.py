"""The house style's static checks, run with the suite: ruff (120 columns) and mypy --strict on our own code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("tool", [["ruff", "check", "."], ["mypy"]], ids=["ruff", "mypy-strict"])
def test_the_code_passes_the_static_check(tool: list[str]) -> None:
    # Given the project's own configuration in pyproject.toml, when the tool runs, then it finds nothing
    run = subprocess.run([sys.executable, "-m", *tool], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
