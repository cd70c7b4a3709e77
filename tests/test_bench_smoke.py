"""The benchmark suite's smoke path: a tiny run of `python -m bench` writes sane result JSON (no speed asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_a_tiny_benchmark_run_writes_results_with_sane_numbers_for_both_sides(tmp_path: Path) -> None:
    # Given a tiny run: 50 callbacks per side through 1 x 8 workers, and 10 pickup samples per side
    out = tmp_path / "smoke.json"
    command = [
        sys.executable, "-m", "bench", "--quick", "--only", "throughput,pickup", "--callbacks", "50",
        "--pickup-samples", "10", "--pickup-pause-ms", "100", "--idle-s", "0.5", "--out", str(out),
    ]  # fmt: skip
    # When it runs (in its own process: it sets the environment before importing actors)
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # Then it printed one line per benchmark and wrote the JSON
    printed = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    assert {"sink", "throughput_1x8", "memory", "pickup_p50", "pickup_p99", "idle_cpu", "idle_redis"} <= printed
    results = json.loads(out.read_text())
    assert results["meta"]["machine"]["nproc"] >= 1
    assert results["sink"]["requests_per_s"] > 0
    benchmarks = results["benchmarks"]
    # ... with positive, finite figures for both sides and a ratio of their medians
    for name in ("throughput_1x8", "memory", "pickup_p50", "pickup_p99"):
        entry = benchmarks[name]
        for side in ("ours", "bare"):
            assert entry[side]["min"] <= entry[side]["median"] <= entry[side]["max"], (name, side)
            assert 0 < entry[side]["median"] and math.isfinite(entry[side]["median"]), (name, side)
        assert entry["ratio"] == pytest.approx(entry["ours"]["median"] / entry["bare"]["median"])
    assert 10 < benchmarks["memory"]["ours"]["median"] < 500  # MiB of one worker process
    for side in ("ours", "bare"):
        samples = benchmarks["pickup_p50"]["samples_ms"][side]
        assert len(samples) == 10
        assert all(0 < ms < 10_000 for ms in samples), samples
        assert benchmarks["idle_cpu"][side]["median"] >= 0
        assert benchmarks["idle_redis"][side]["median"] >= 0
    assert benchmarks["throughput_1x8"]["met"] in (True, False)


def test_the_replica_acks_benchmark_runs_both_settings() -> None:
    # Given a tiny run of bench.replica_acks (a primary, its replica, 30 sends per setting)
    command = [sys.executable, "-m", "bench.replica_acks", "--sends", "30", "--reps", "1"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    # Then it prints a rate for each setting and their ratio
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MIN_REPLICA_ACKS=0: " in done.stdout and "MIN_REPLICA_ACKS=1: " in done.stdout
    assert "x the sends per second with WAIT 1" in done.stdout
