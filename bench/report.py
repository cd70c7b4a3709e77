"""Render a results JSON as the Markdown tables of BENCHMARKS.md.

Usage: python -m bench.report [bench/results/full.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.suite import RESULTS_DIR, format_figure

#: Row titles of the comparison table, in order.
TITLES = {
    "throughput_1x8": "1. Webhook throughput, 1 process x 8 threads",
    "throughput_2x8": "1. Webhook throughput, 2 processes x 8 threads",
    "enqueue": "2. Enqueue, send() in one process",
    "pickup_p50": "3. Pickup latency p50 (idle workers)",
    "pickup_p95": "3. Pickup latency p95",
    "pickup_p99": "3. Pickup latency p99",
    "idle_cpu": "3. Idle CPU of the worker processes",
    "idle_redis": "3. Idle Redis load (commands)",
    "email": "4. Email (1 x 8)",
    "memory": "5. Peak RSS, 1 worker process x 8 threads",
}


def _cell(stats: dict[str, Any]) -> str:
    fig = format_figure
    return f"{fig(stats['median'])} ({fig(stats['min'])}–{fig(stats['max'])})"


def render(results: dict[str, Any]) -> str:
    """Return the Markdown: the comparison table, then the threads table."""
    rows = [
        "| benchmark | unit | ours: median (min–max) | bare: median (min–max) | ours/bare | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    benchmarks = results["benchmarks"]
    for name, title in TITLES.items():
        entry = benchmarks.get(name)
        if entry is None:
            continue
        ratio = "n/a" if entry.get("ratio") is None else f"{entry['ratio']:.2f}"
        verdict = {True: "met", False: "**missed**", None: "–"}[entry["met"]]
        rows.append(
            f"| {title} | {entry['unit']} | {_cell(entry['ours'])} | {_cell(entry['bare'])} | {ratio} "
            f"| {entry['target']} | {verdict} |"
        )
    cpu_rows = [
        f"| {name.removeprefix('throughput_')} | {_cell(entry['cpu_ms_per_msg']['ours'])} "
        f"| {_cell(entry['cpu_ms_per_msg']['bare'])} |"
        for name, entry in benchmarks.items()
        if name.startswith("throughput_") and "cpu_ms_per_msg" in entry
    ]
    if cpu_rows:
        rows += ["", "Worker CPU per delivered webhook during the throughput runs, ms:", ""]
        rows += ["| processes x threads | ours | bare |", "|---|---|---|", *cpu_rows]
    threads = benchmarks.get("threads")
    if threads:
        rows += ["", f"Throughput against threads per process ({threads['note']}), msg/s:", ""]
        rows += ["| threads | ours: median (min–max) | bare: median (min–max) | ours/bare |", "|---|---|---|---|"]
        for count, point in threads["points"].items():
            ratio = point["ours"]["median"] / point["bare"]["median"]
            rows.append(f"| {count} | {_cell(point['ours'])} | {_cell(point['bare'])} | {ratio:.2f} |")
    return "\n".join(rows)


def main() -> None:
    """Print the tables of the given (or the full run's) results."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR / "full.json"
    print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
