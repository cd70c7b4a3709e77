"""The delivery ledger's cost: webhook throughput and send() rate with the ledger on, off, and bare Dramatiq.

`python -m bench.ledger [--reps 3] [--callbacks 5000] [--configs 1x8,2x8]` (about 3 minutes by default). It
uses the suite's stack and its throughput run (bench/suite.py `drain_run`, unchanged): n callbacks enqueued,
then the workers started and the sink timed from the first POST to the last. Three sides in the same run, in
rotating order: ours with the ledger (the default), ours with WHISKYPAY_LEDGER_ENABLED=false (in the workers,
and the ledger middleware taken off this process's broker for the sends), and bare Dramatiq. Results go to
bench/results/ledger.json and are printed; BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from bench.suite import RESULTS_DIR, Sizes, Stack, drain_run, machine

SIDES = ("ledger", "no-ledger", "bare")


def _config(text: str) -> tuple[int, int]:
    processes, threads = text.lower().split("x")
    return int(processes), int(threads)


def run_side(stack: Stack, side: str, *, n: int, processes: int, threads: int, tag: str) -> dict[str, Any]:
    """Run one throughput drain of side ("ledger", "no-ledger" or "bare")."""
    if side == "bare":
        return drain_run(stack, "bare", n=n, processes=processes, threads=threads, tag=tag)
    import actors
    from middleware.ledger import DeliveryLedger

    middleware = actors.broker.middleware
    ledger = next(m for m in middleware if isinstance(m, DeliveryLedger))
    index = middleware.index(ledger)
    if side == "no-ledger":
        stack.env["WHISKYPAY_LEDGER_ENABLED"] = "false"
        middleware.remove(ledger)
    try:
        return drain_run(stack, "ours", n=n, processes=processes, threads=threads, tag=tag)
    finally:
        stack.env.pop("WHISKYPAY_LEDGER_ENABLED", None)
        if ledger not in middleware:
            middleware.insert(index, ledger)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print it and write bench/results/ledger.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--callbacks", type=int, default=5000)
    parser.add_argument("--configs", default="1x8,2x8", help="processes x threads, comma-separated")
    parser.add_argument("--sink", choices=("nginx", "python"), default="nginx")
    args = parser.parse_args(argv)
    configs = [_config(part) for part in args.configs.split(",")]
    stack = Stack(Sizes(reps=args.reps, callbacks=args.callbacks, configs=tuple(configs), benchmarks=()),
                  sink=args.sink)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for processes, threads in configs:
            cfg = f"{processes}x{threads}"
            runs[cfg] = {side: [] for side in SIDES}
            for rep in range(args.reps):
                order = SIDES[rep % 3:] + SIDES[: rep % 3]
                for side in order:
                    figures = run_side(stack, side, n=args.callbacks, processes=processes, threads=threads,
                                       tag=f"ledger-{cfg}-{side}-{rep}")
                    runs[cfg][side].append(figures)
                    print(f"{cfg} {side:<9} rep {rep}: {figures['msg_per_s']:7.0f} msg/s, "
                          f"{figures['enqueue_per_s']:6.0f} send/s, {figures['cpu_ms_per_msg']:.2f} ms CPU/msg",
                          file=sys.stderr)
    finally:
        stack.close(keep_logs=False)
    summary: dict[str, Any] = {"machine": machine(), "callbacks": args.callbacks, "reps": args.reps, "configs": {}}
    for cfg, by_side in runs.items():
        entry: dict[str, Any] = {}
        for side, figures in by_side.items():
            entry[side] = {
                key: statistics.median(f[key] for f in figures)
                for key in ("msg_per_s", "enqueue_per_s", "cpu_ms_per_msg")
            } | {"msg_per_s_all": [round(f["msg_per_s"]) for f in figures]}
        entry["ledger_over_no_ledger"] = entry["ledger"]["msg_per_s"] / entry["no-ledger"]["msg_per_s"]
        entry["ledger_over_bare"] = entry["ledger"]["msg_per_s"] / entry["bare"]["msg_per_s"]
        entry["send_ledger_over_no_ledger"] = entry["ledger"]["enqueue_per_s"] / entry["no-ledger"]["enqueue_per_s"]
        summary["configs"][cfg] = entry
        ledger, off, bare = entry["ledger"], entry["no-ledger"], entry["bare"]
        print(f"{cfg}: msg/s ledger {ledger['msg_per_s']:.0f} {ledger['msg_per_s_all']}, "
              f"no ledger {off['msg_per_s']:.0f} {off['msg_per_s_all']}, bare {bare['msg_per_s']:.0f} "
              f"{bare['msg_per_s_all']}: ledger/no-ledger {entry['ledger_over_no_ledger']:.2f}x, "
              f"ledger/bare {entry['ledger_over_bare']:.2f}x; send/s ledger {ledger['enqueue_per_s']:.0f}, "
              f"no ledger {off['enqueue_per_s']:.0f} ({entry['send_ledger_over_no_ledger']:.2f}x); CPU ms/msg "
              f"ledger {ledger['cpu_ms_per_msg']:.2f}, no ledger {off['cpu_ms_per_msg']:.2f}, "
              f"bare {bare['cpu_ms_per_msg']:.2f}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "ledger.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
