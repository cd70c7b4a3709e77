"""Render a results JSON as the Markdown tables of BENCHMARKS.md.

Usage: python -m bench.report [bench/results/full.json]. `python -m bench` also writes them next to the JSON
(`bench/results/<mode>.md`).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from bench.suite import RESULTS_DIR, format_figure

#: Row titles of the fixed rows of the comparison table, in order; slow_* and many_* rows are titled by `title`.
TITLES = {
    "throughput_1x8": "Webhook throughput, fast sink, 1 process x 8 threads",
    "throughput_2x8": "Webhook throughput, fast sink, 2 processes x 8 threads",
    "enqueue": "Enqueue, send() with validation and an event_id, one process",
    "memory": "Peak RSS, 1 worker process x 8 threads (fast sink)",
    "pickup_p50": "Pickup latency p50 (idle workers)",
    "pickup_p95": "Pickup latency p95",
    "pickup_p99": "Pickup latency p99",
    "idle_cpu": "Idle CPU of the worker processes",
    "idle_redis": "Idle Redis load (commands)",
    "email": "Email (1 x 8)",
}

_SLOW = re.compile(r"^(slow|many)_(\d+)x(\d+)(?:_(cpu|rss|launch))?$")

_WHAT = {
    None: "throughput",
    "cpu": "worker CPU per delivered webhook",
    "rss": "peak RSS per worker process",
    "launch": "launch to first POST",  # spawn of `python -m dramatiq` to the sink's first arrival
}


def title(name: str, results: dict[str, Any]) -> str:
    """Return the row title of a benchmark entry."""
    match = _SLOW.match(name)
    if match is None:
        return TITLES.get(name, name)
    kind, processes, threads, what = match.groups()
    slow = results.get("sink", {}).get("slow", {})
    delay = f"{slow.get('delay_ms', 100):g} ms sink"
    where = f"{results['meta']['sizes'].get('merchants', 100)} merchants" if kind == "many" else "one merchant"
    what_text = _WHAT[what]
    return f"{what_text[0].upper()}{what_text[1:]}, {delay}, {where}, {processes} x {threads}"


def _order(results: dict[str, Any]) -> list[str]:
    names = list(results["benchmarks"])
    slow = [n for n in names if _SLOW.match(n)]
    fixed_first = ["throughput_1x8", "throughput_2x8", "enqueue", "memory"]

    def slow_key(name: str) -> tuple[int, int, int, int]:
        kind, processes, threads, what = _SLOW.match(name).groups()  # type: ignore[union-attr]
        return (kind == "many", [None, "cpu", "rss", "launch"].index(what), int(processes), int(threads))

    return (
        [n for n in fixed_first if n in names]
        + sorted(slow, key=slow_key)
        + [n for n in TITLES if n in names and n not in fixed_first]
    )


def _cell(stats: dict[str, Any]) -> str:
    fig = format_figure
    return f"{fig(stats['median'])} ({fig(stats['min'])}–{fig(stats['max'])})"


def render(results: dict[str, Any]) -> str:
    """Return the Markdown: the comparison table, then the CPU and launch table, then the threads tables."""
    rows = [
        "| benchmark | unit | ours: median (min–max) | bare: median (min–max) | ours/bare | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    benchmarks = results["benchmarks"]
    for name in _order(results):
        entry = benchmarks[name]
        if "ours" not in entry:
            continue
        ratio = "n/a" if entry.get("ratio") is None else f"{entry['ratio']:.2f}"
        verdict = {True: "met", False: "**missed**", None: "–"}[entry["met"]]
        ours, bare = _cell(entry["ours"]), _cell(entry["bare"])
        share = entry.get("share_of_limit")
        if share:
            ours += f", {share['ours']:.0%} of limit"
            bare += f", {share['bare']:.0%} of limit"
        rows.append(
            f"| {title(name, results)} | {entry['unit']} | {ours} | {bare} | {ratio} | {entry['target']} | {verdict} |"
        )
    cpu_rows = [
        f"| {name.removeprefix('throughput_')} | {_cell(entry['cpu_ms_per_msg']['ours'])} "
        f"| {_cell(entry['cpu_ms_per_msg']['bare'])} "
        + (
            f"| {_cell(entry['launch_to_first_post_s']['ours'])} | {_cell(entry['launch_to_first_post_s']['bare'])} |"
            if "launch_to_first_post_s" in entry
            else "| – | – |"
        )
        for name, entry in benchmarks.items()
        if name.startswith("throughput_") and "cpu_ms_per_msg" in entry
    ]
    if cpu_rows:
        rows += ["", "Fast sink: worker CPU per delivered webhook (ms) and launch to first POST (s):", ""]
        rows += ["| processes x threads | CPU ours | CPU bare | launch ours | launch bare |", "|---|---|---|---|---|"]
        rows += cpu_rows
    for key in ("threads", "slow_threads"):
        threads = benchmarks.get(key)
        if not threads:
            continue
        slow = "limit" in next(iter(threads["points"].values()))
        rows += ["", f"Throughput against threads per process ({threads['note']}), msg/s:", ""]
        if slow:
            rows += ["| threads | callbacks | limit | ours: median (min–max) | bare: median (min–max) | ours/bare |",
                     "|---|---|---|---|---|---|"]  # fmt: skip
        else:
            rows += ["| threads | ours: median (min–max) | bare: median (min–max) | ours/bare |", "|---|---|---|---|"]
        for count, point in threads["points"].items():
            ratio = point["ours"]["median"] / point["bare"]["median"]
            lead = f"| {count} | {threads['callbacks'][count]:,} | {point['limit']:,.0f} " if slow else f"| {count} "
            rows.append(f"{lead}| {_cell(point['ours'])} | {_cell(point['bare'])} | {ratio:.2f} |")
    return "\n".join(rows)


def main() -> None:
    """Print the tables of the given (or the full run's) results."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR / "full.json"
    print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
