"""Render a results JSON as the Markdown tables of BENCHMARKS.md.

Usage: python -m bench.report [RESULTS.json] [--update] (default bench/results/full.json). `python -m bench`
writes the tables next to the JSON (`bench/results/<mode>.md`); `--update` rewrites the generated parts of
BENCHMARKS.md (between `<!-- bench-machine:... -->` and `<!-- bench-results:... -->`) and of README.md
(`<!-- bench-summary:... -->`), which a full `bench/run` does by itself.
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
        deferred = sum(entry.get("deferred", {}).get("ours", []))
        if deferred:
            ours += f", {deferred:,} deliveries deferred by the slow-server cap"
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


#: The rows of the README's summary: issue 14's targets, in its order.
SUMMARY = (
    ("throughput_1x8", "throughput, fast sink, 1 x 8"),
    ("throughput_2x8", "throughput, fast sink, 2 x 8"),
    ("slow_2x64", "throughput, 100 ms sink, 2 x 64"),
    ("slow_2x128", "throughput, 100 ms sink, 2 x 128"),
    ("many_2x64", "throughput, 100 ms sink, 100 merchants, 2 x 64"),
    ("many_2x128", "throughput, 100 ms sink, 100 merchants, 2 x 128"),
    ("slow_2x64_cpu", "worker CPU per delivered webhook, 100 ms sink, 2 x 64"),
    ("slow_2x128_cpu", "worker CPU per delivered webhook, 100 ms sink, 2 x 128"),
    ("enqueue", "enqueue, one process, with validation and an event_id"),
    ("memory", "peak RSS per worker process, 1 x 8"),
    ("slow_2x128_rss", "peak RSS per worker process, 100 ms sink, 2 x 128"),
    ("slow_2x64_launch", "launch to first POST, 2 x 64"),
    ("slow_2x128_launch", "launch to first POST, 2 x 128"),
    ("pickup_p50", "idle pickup latency p50"),
    ("pickup_p99", "idle pickup latency p99"),
)


def render_summary(results: dict[str, Any]) -> str:
    """Return the README's table: one row per target, both medians, the ratio and the verdict."""
    rows = ["| figure | ours | bare | ours/bare | target | verdict |", "|---|---|---|---|---|---|"]
    if results["meta"].get("mode") != "full":
        rows.insert(0, f"**Not the full run** (`{results['meta']['command']}`): figures to look at, not to quote.\n")
    fig = format_figure
    for name, label in SUMMARY:
        entry = results["benchmarks"].get(name)
        if entry is None:
            continue
        unit = entry["unit"]
        ours = f"{fig(entry['ours']['median'])} {unit}"
        share = entry.get("share_of_limit")
        if share:
            ours += f" ({share['ours']:.0%} of the limit)"
        ratio = "n/a" if entry.get("ratio") is None else f"{entry['ratio']:.2f}"
        verdict = {True: "met", False: "**missed**", None: "–"}[entry["met"]]
        rows.append(
            f"| {label} | {ours} | {fig(entry['bare']['median'])} {unit} | {ratio} | {entry['target']} | {verdict} |"
        )
    return "\n".join(rows)


def render_machine(results: dict[str, Any]) -> str:
    """Return the Machine table: what the figures depend on, and the sinks' own rates in the same run."""
    meta, sink = results["meta"], results.get("sink", {})
    machine = meta["machine"]
    rows = [
        "| | |",
        "|---|---|",
        f"| cores (nproc) | {machine['nproc']} |",
        f"| CPU | {machine['cpu']} |",
        f"| kernel | {machine['kernel']} |",
        f"| Python | {machine['python']} |",
        f"| redis-server | {machine['redis_server']} |",
        f"| dramatiq / redis-py / requests | {machine['dramatiq']} / {machine['redis_py']} / {machine['requests']} |",
    ]
    if sink:
        line = f"| HTTP sink | {sink['server']}: {sink['requests_per_s']:,.0f} req/s under {sink['load']}"
        if "headroom_x" in sink:
            line += f", {sink['headroom_x']:.0f}x the fastest worker run"
        rows.append(line + " |")
    slow = sink.get("slow")
    if slow:
        line = f"| 100 ms sink | {slow['server']}: {slow['requests_per_s']:,.0f} req/s under {slow['load']}"
        if "headroom_x" in slow:
            enough = "met" if slow["headroom_x"] >= 2 else "**missed**: the sink may limit the slow runs"
            line += f", {slow['headroom_x']:.1f}x the fastest worker run (at least 2x: {enough})"
        rows.append(line + " |")
    if "smtp_messages_per_s" in sink:
        smtp = sink["smtp_messages_per_s"]
        rows.append(f"| SMTP sink | aiosmtpd: {smtp:,.0f} msg/s (8 threads, reused connections) |")
    if meta.get("mode") != "full":
        rows.append(
            "| **note** | **not the full run** (fewer repetitions or smaller sizes): figures to look at, not to quote; "
            "`bench/run` replaces them |"
        )
    rows.append(f"| code | {machine['commit']} |")
    rows.append(f"| run | {meta['started_at']}, `{meta['command']}`, {meta.get('duration_s', 0):.0f} s |")
    return "\n".join(rows)


def _replace_between(text: str, marker: str, body: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update_docs(results: dict[str, Any], *, benchmarks_md: Path, readme: Path) -> list[Path]:
    """Rewrite the generated parts of BENCHMARKS.md (machine, results) and of the README (summary)."""
    text = benchmarks_md.read_text()
    text = _replace_between(text, "bench-machine", render_machine(results))
    text = _replace_between(text, "bench-results", render(results))
    benchmarks_md.write_text(text)
    readme.write_text(_replace_between(readme.read_text(), "bench-summary", render_summary(results)))
    return [benchmarks_md, readme]


def main() -> None:
    """Print the tables of the given (or the full run's) results; with --update, write them into the docs."""
    args = [arg for arg in sys.argv[1:] if arg != "--update"]
    path = Path(args[0]) if args else RESULTS_DIR / "full.json"
    results = json.loads(path.read_text())
    if "--update" in sys.argv[1:]:
        root = RESULTS_DIR.parent.parent
        for done in update_docs(results, benchmarks_md=root / "BENCHMARKS.md", readme=root / "README.md"):
            print(f"updated {done}")
        return
    print(render_machine(results) + "\n\n" + render(results) + "\n\n" + render_summary(results))


if __name__ == "__main__":
    main()
