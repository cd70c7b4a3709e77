"""The benchmarks: ours (the whole `actors` pipeline, as a black box) against bare Dramatiq, side by side.

Every benchmark runs both sides in the same run, alternating which goes first at each repetition, and reports
the median, min and max over the repetitions and the ratio ours/bare of the medians. Ours and bare each get a
private redis-server of the same configuration (never the machine's 6379), the same HTTP sink (nginx), the same
SMTP sink (aiosmtpd) and the same worker command line (`python -m dramatiq MODULE --queues Q --processes P
--threads T`); only the module differs: `actors` or `bench.bare:broker`. Both run from bytecode, as an installed
package does, whatever the caller's PYTHONDONTWRITEBYTECODE says.

How each figure is taken:
- throughput: N callbacks are enqueued first, then the workers start; rate = (N - 1) / (last - first arrival)
  in the sink's access log (nginx `$msec`), counting distinct URIs (one per message) until all N arrived.
  After that the queue's `.msgs` hash must be empty (every message acked) and nothing dead-lettered.
- enqueue: N `.send()` calls in this process, timed with perf_counter; no worker running.
- pickup: both sides' workers (1 x 8) run at once; one message at a time, alternating sides, each side idle
  for at least the pause between its messages; latency = arrival at the Python receiver (time.monotonic in
  its handler) - the moment send() was called, both in this process.
- idle: while both sides' workers sit idle, CPU seconds of their worker processes' threads (schedstat) and
  Redis commands (INFO total_commands_processed, minus our INFO) over the idle window.
- email: N payments (2 N emails) enqueued, then the workers start; rate from the SMTP sink's arrival times.
- memory: VmHWM of the single worker process of each 1 x 8 throughput run, read before it stops.
- slow: as throughput, against `bench.slowsink` answering after 100 ms (merchants wait, they do not compute),
  2 x 64 and 2 x 128; also the share of the limit (processes x threads / delay), worker CPU per delivered
  webhook while draining, peak RSS per worker process, and launch to first POST (spawn to first arrival).
- many: as slow, with the callbacks spread round-robin over 100 loopback addresses (127.0.0.2 to 127.0.0.101),
  one sink listening on all: a hundred merchants, so per-host pools, caps and breakers are in play.
- slowplot: throughput against threads per process for the 100 ms sink (2 processes; points that are also
  slow configs reuse those runs), N scaled per point so each takes a few seconds.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from dramatiq import Actor

from bench.measure import (
    cpu_seconds,
    cpu_seconds_ns,
    peak_rss_mib,
    percentiles,
    redis_counters,
    redis_delta,
    summary,
    wait_for,
)
from bench.sinks import (
    REPO_ROOT,
    HttpSink,
    SinkRate,
    many_hosts,
    measure_sink_rate,
    start_http_sink,
    start_slow_sink,
)
from whiskypay.devstack import HttpReceiver, RedisServer, SmtpSink, WorkerProcess

#: The two sides of every comparison.
SIDES = ("ours", "bare")

#: Every benchmark, in the order they run ("memory" is read during the throughput runs).
BENCHMARKS = ("enqueue", "throughput", "plot", "slow", "many", "slowplot", "pickup", "email")

#: The benchmarks that need the slow-merchant sink.
SLOW_BENCHMARKS = frozenset({"slow", "many", "slowplot"})

#: The webhook fields every benchmark message carries (valid for ours' schema).
PAYMENT = {"email": "buyer@example.com", "plan": "pro", "price": 19.99, "timestamp": "2026-11-27T21:00:00Z"}

#: Where results and the plot go by default.
RESULTS_DIR = REPO_ROOT / "bench" / "results"
PLOT_PATH = REPO_ROOT / "bench" / "throughput_threads.png"


@dataclass(frozen=True)
class Sizes:
    """What to run, and how much of it.

    Parameters:
        reps: repetitions of every comparison (each runs ours and bare once).
        callbacks: messages per throughput run.
        configs: (processes, threads) of the throughput runs.
        plot_threads: threads per process of the throughput-vs-threads plot (1 process).
        plot_callbacks: messages per plot point.
        enqueue: send() calls per enqueue run.
        pickup_samples: messages per side per pickup repetition.
        pickup_pause_s: the least idle time of a side's workers between two of its messages, in seconds.
        idle_s: the idle CPU / Redis window, in seconds.
        settle_s: wait after the workers are ready, before the idle window, in seconds.
        payments: payments per email run (two emails each).
        sink_rate_s: how long the sink's own rate is measured, in seconds.
        prefetch: dramatiq_queue_prefetch for both sides; 0 leaves Dramatiq's default (threads x 2).
        slow_delay_ms: how long the slow sink waits before answering, in milliseconds.
        slow_configs: (processes, threads) of the slow-sink and many-merchants runs.
        slow_callbacks: messages per slow-sink run (the most per slow plot point, too).
        merchants: loopback addresses of the many-merchants runs (127.0.0.2 upwards).
        slow_plot_processes: processes of the slow-sink plot.
        slow_plot_threads: threads per process of the slow-sink plot.
        slow_plot_s: the target duration of one slow plot point at the limit rate, in seconds (scales N).
        benchmarks: which benchmarks to run.
    """

    reps: int = 3
    callbacks: int = 5000
    configs: tuple[tuple[int, int], ...] = ((1, 8), (2, 8))
    plot_threads: tuple[int, ...] = (1, 2, 4, 8, 16)
    plot_callbacks: int = 1000
    enqueue: int = 5000
    pickup_samples: int = 200
    pickup_pause_s: float = 0.2
    idle_s: float = 10.0
    settle_s: float = 2.0
    payments: int = 1000
    sink_rate_s: float = 3.0
    prefetch: int = 0
    slow_delay_ms: float = 100.0
    slow_configs: tuple[tuple[int, int], ...] = ((2, 64), (2, 128))
    slow_callbacks: int = 2000
    merchants: int = 100
    slow_plot_processes: int = 2
    slow_plot_threads: tuple[int, ...] = (1, 8, 32, 64, 128)
    slow_plot_s: float = 2.0
    benchmarks: tuple[str, ...] = BENCHMARKS


#: `--quick`: every benchmark once, small, in well under a minute (a smoke run, not figures to quote).
QUICK = Sizes(
    reps=1, callbacks=400, configs=((1, 8),), plot_threads=(1, 8), plot_callbacks=200, enqueue=1000,
    pickup_samples=20, idle_s=2.0, settle_s=1.0, payments=100, sink_rate_s=1.0,
    slow_configs=((2, 16),), slow_callbacks=300, merchants=20, slow_plot_threads=(1, 16), slow_plot_s=1.0,
)  # fmt: skip


class TimedSmtpSink(SmtpSink):
    """devstack's SmtpSink (aiosmtpd) that only records when each message arrived (time.monotonic).

    It accepts every DATA without parsing or keeping the message, unlike SmtpSink, so that the sink is as
    fast as aiosmtpd allows (parsing each message halved its rate here).
    """

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.arrivals.append(time.monotonic())
        return "250 Message accepted for delivery"

    def reset(self) -> None:
        """Forget messages, arrivals and the connection count."""
        self.clear()
        self.arrivals = []


def _env_for(stack_env: dict[str, str], prefetch: int) -> dict[str, str]:
    env = dict(stack_env)
    if prefetch:
        env["dramatiq_queue_prefetch"] = str(prefetch)
    return env


class Stack:
    """Everything the benchmarks talk to: two private Redis servers, the sinks, the receiver, both actor sets.

    Sets this process's environment (WHISKYPAY_* and BENCH_*) and then imports `actors` and `bench.bare`, which
    build their brokers from it. Any WHISKYPAY_* or dramatiq_* variable inherited from the caller is dropped, so
    a developer's Sentry DSN or Redis URL never reaches a benchmark.

    Parameters:
        sizes: the run's sizes (prefetch is applied to both sides' workers).
        sink: "nginx" or "python".
    """

    def __init__(self, sizes: Sizes, *, sink: str) -> None:
        self.sizes = sizes
        self.workdir = tempfile.mkdtemp(prefix="whiskypay-bench-")
        self.redis = {side: RedisServer(workdir=os.path.join(self.workdir, f"redis-{side}")) for side in SIDES}
        for server in self.redis.values():
            server.start()
        self.clients = {side: redis.Redis.from_url(server.url) for side, server in self.redis.items()}
        self.sink: HttpSink = start_http_sink(prefer=sink)
        #: The slow-merchant sink (only when a slow benchmark runs): 127.0.0.1 plus the many-merchants addresses.
        self.slow_sink: HttpSink | None = None
        if SLOW_BENCHMARKS & set(sizes.benchmarks):
            self.merchant_hosts = many_hosts(sizes.merchants)
            self.slow_sink = start_slow_sink(delay_ms=sizes.slow_delay_ms, hosts=("127.0.0.1", *self.merchant_hosts))
        self.smtp = TimedSmtpSink().start()
        self.receiver = HttpReceiver().start()
        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()  # random per run, never printed
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WHISKYPAY_", "dramatiq_", "BENCH_"))}
        env.update(
            PYTHONPATH=str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
            PYTHONUNBUFFERED="1",
            WHISKYPAY_REDIS_URL=self.redis["ours"].url,
            # Both sides run on Redis without persistence (AOF would measure the disk); ours' workers refuse such a
            # Redis unless told (issue 15's durability check).
            WHISKYPAY_REDIS_ALLOW_VOLATILE="true",
            WHISKYPAY_ALLOW_PRIVATE_CALLBACKS="true",
            WHISKYPAY_CALLBACK_HTTPS_ONLY="false",
            WHISKYPAY_WEBHOOK_SECRET=secret,
            WHISKYPAY_MAIL_FROM="payments@bench.test",
            WHISKYPAY_SMTP_HOST=self.smtp.host,
            WHISKYPAY_SMTP_PORT=str(self.smtp.port),
            BENCH_BARE_REDIS_URL=self.redis["bare"].url,
            BENCH_SMTP_HOST=self.smtp.host,
            BENCH_SMTP_PORT=str(self.smtp.port),
        )
        # Both sides run from bytecode, as an installed package does (`pip install` compiles it): without this a
        # machine with PYTHONDONTWRITEBYTECODE=1 makes every worker process compile ours' editable modules (and
        # bare's bench/bare.py) again, while the installed libraries of both sides load compiled. A private cache in
        # the work folder, the same for both sides, warmed once below; the workers add what they import later.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(self.workdir, "pycache")
        self.env = _env_for(env, sizes.prefetch)
        for key in [k for k in os.environ if k.startswith(("WHISKYPAY_", "dramatiq_", "BENCH_"))]:
            del os.environ[key]
        os.environ.update({k: v for k, v in self.env.items() if k.startswith(("WHISKYPAY_", "BENCH_", "dramatiq_"))})
        subprocess.run(
            [sys.executable, "-c", "import dramatiq.cli, actors, bench.bare"],
            cwd=str(REPO_ROOT), env=self.env, check=True, timeout=120,
        )  # fmt: skip
        import actors
        from bench import bare

        self.namespace = {"ours": actors.broker.namespace, "bare": bare.NAMESPACE}
        self.callback_actor: dict[str, Actor[..., Any]] = {"ours": actors.send_callback, "bare": bare.bare_callback}
        self.email_actor: dict[str, Actor[..., Any]] = {"ours": actors.send_email, "bare": bare.bare_email}
        self.broker_class = {"ours": type(actors.broker).__qualname__, "bare": type(bare.broker).__qualname__}
        self._workers = 0

    def worker(self, side: str, queue: str, *, processes: int, threads: int) -> WorkerProcess:
        """Return an unstarted worker of side consuming queue.

        Parameters:
            side: "ours" or "bare".
            queue: the queue to consume.
            processes: worker processes.
            threads: threads per process.
        """
        self._workers += 1
        return WorkerProcess(
            "--queues", queue,
            env=self.env, cwd=str(REPO_ROOT), processes=processes, threads=threads,
            log_path=os.path.join(self.workdir, f"worker-{self._workers:03d}-{side}.log"),
            module="actors" if side == "ours" else "bench.bare:broker",
        )  # fmt: skip

    def flush(self, side: str) -> None:
        """Empty side's Redis."""
        self.clients[side].flushall()

    def unacked(self, side: str, queue: str) -> int:
        """Return how many messages of queue are not acked yet (queued, prefetched or running)."""
        return int(self.clients[side].hlen(f"{self.namespace[side]}:{queue}.msgs"))

    def dead(self, side: str, queue: str) -> int:
        """Return how many messages of queue were dead-lettered."""
        return int(self.clients[side].zcard(f"{self.namespace[side]}:{queue}.XQ"))

    def close(self, *, keep_logs: bool) -> None:
        """Stop every server; remove the work folder unless keep_logs."""
        self.receiver.stop()
        self.smtp.stop()
        self.sink.stop()
        if self.slow_sink is not None:
            self.slow_sink.stop()
        for client in self.clients.values():
            client.close()
        for server in self.redis.values():
            server.stop()
        if not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _order(rep: int) -> tuple[str, ...]:
    """Ours first at even repetitions, bare first at odd ones."""
    return SIDES if rep % 2 == 0 else SIDES[::-1]


def _stop(worker: WorkerProcess) -> None:
    """SIGKILL the worker group: every message was acked (or the run failed) and Redis is flushed next.

    A graceful stop waits up to a consumer poll for each thread, about 1 s a run for nothing.
    """
    worker.kill()


# ------------------------------------------------------------------------------------------------------------------
# benchmarks
# ------------------------------------------------------------------------------------------------------------------


def enqueue_run(stack: Stack, side: str, *, n: int, tag: str) -> float:
    """Time n send() calls of side's callback actor (no worker running); return sends per second.

    Every send carries an `event_id`, as the gateway's do: ours validates the arguments and reserves the id
    (idempotency) in the same send; bare Dramatiq enqueues the same keyword arguments unchecked.
    """
    stack.flush(side)
    actor = stack.callback_actor[side]
    urls = [stack.sink.url(f"/{tag}/{i}") for i in range(n)]
    started = time.perf_counter()
    for i, url in enumerate(urls):
        actor.send(callback_url=url, event_id=f"evt_{tag}_{i}", **PAYMENT)
    elapsed = time.perf_counter() - started
    if stack.unacked(side, "callbackQueue") != n:
        raise RuntimeError(f"{side}: {n} sends left {stack.unacked(side, 'callbackQueue')} messages in Redis")
    stack.flush(side)
    return n / elapsed


def drain_run(
    stack: Stack,
    side: str,
    *,
    n: int,
    processes: int,
    threads: int,
    tag: str,
    sink: HttpSink | None = None,
    hosts: tuple[str, ...] = ("127.0.0.1",),
) -> dict[str, Any]:
    """Enqueue n callbacks, start side's workers, and time the sink receiving all n; return the figures.

    Parameters:
        sink: the sink the callbacks go to (default: the fast one).
        hosts: the sink's addresses the callbacks are spread over, round-robin.
    """
    sink = sink or stack.sink
    stack.flush(side)
    actor = stack.callback_actor[side]
    prefix = f"/{tag}/"
    started = time.perf_counter()
    for i in range(n):
        url = sink.url(f"{prefix}{i}", host=hosts[i % len(hosts)])
        actor.send(callback_url=url, event_id=f"evt_{tag}_{i}", **PAYMENT)
    enqueue_s = time.perf_counter() - started
    log = sink.access_log()
    worker = stack.worker(side, "callbackQueue", processes=processes, threads=threads)
    seen: set[str] = set()
    first = last = 0.0
    errors = 0
    pids: list[int] = []
    cpu_at_first = 0.0
    done_at_first = 0
    spawned = time.monotonic()
    spawned_wall = time.time()  # the sinks log wall-clock arrival times
    worker.start(wait_ready=False)
    master = worker.pid
    master_at_first = 0.0
    deadline = spawned + 60 + n / 50
    try:
        while len(seen) < n:
            for hit in log.read():
                if not hit.uri.startswith(prefix):
                    continue
                if hit.status != 200:
                    errors += 1
                    continue
                if not seen:
                    first = hit.at
                seen.add(hit.uri)
                last = max(last, hit.at)
            if seen and not pids:
                pids = worker.pids_of_workers()
                cpu_at_first = sum(cpu_seconds(pid) for pid in pids)
                master_at_first = cpu_seconds(master) if master else 0.0
                done_at_first = len(seen)
            if time.monotonic() > deadline or not worker.running():
                raise RuntimeError(
                    f"{side} {processes}x{threads}: {len(seen)}/{n} callbacks arrived "
                    f"(worker {'exited' if not worker.running() else 'still running'}); log: {worker.log_path}"
                )
            time.sleep(0.01)
        drained = time.monotonic()
        pids = worker.pids_of_workers() or pids
        cpu_end = sum(cpu_seconds(pid) for pid in pids)
        master_end = cpu_seconds(master) if master else 0.0
        rss = [peak_rss_mib(pid) for pid in pids]
        wait_for(lambda: stack.unacked(side, "callbackQueue") == 0, timeout_s=20, what=f"{side}: every message acked")
        dead = stack.dead(side, "callbackQueue")
        if dead or errors:
            raise RuntimeError(f"{side}: {dead} dead letters, {errors} non-200 answers; log: {worker.log_path}")
    finally:
        _stop(worker)
    stack.flush(side)
    # Ours' slow-server cap defers (re-enqueues later) deliveries to a server whose requests took over 1 s: on a
    # starved machine that can happen to the 100 ms sink too, and it shows in the figure; count it, to know.
    deferred = worker.log().count(" deferred: ") if side == "ours" else 0
    return {
        "deferred": deferred,
        "msg_per_s": (n - 1) / max(last - first, 1e-3),
        "first_to_last_s": last - first,
        "spawn_to_drained_s": drained - spawned,
        "launch_to_first_post_s": first - spawned_wall,
        "enqueue_per_s": n / enqueue_s,
        "cpu_ms_per_msg": 1000 * (cpu_end - cpu_at_first) / max(n - done_at_first, 1),
        # The `dramatiq` master relays the worker processes' log lines: its CPU, per webhook, alongside.
        "master_cpu_ms_per_msg": 1000 * (master_end - master_at_first) / max(n - done_at_first, 1),
        "peak_rss_mib": rss,
    }


def pickup_rep(
    stack: Stack, *, rep: int, samples: int, pause_s: float, idle_s: float, settle_s: float
) -> dict[str, Any]:
    """Run both sides' idle workers at once: measure idle CPU and Redis load, then pickup latency."""
    for side in SIDES:
        stack.flush(side)
    workers = {side: stack.worker(side, "callbackQueue", processes=1, threads=8) for side in SIDES}
    try:
        for worker in workers.values():
            worker.start(wait_ready=True)
        time.sleep(settle_s)
        # Idle: both sides sit still; CPU per process and commands per Redis server are each side's own.
        pids = {side: worker.pids_of_workers() for side, worker in workers.items()}
        cpu_before = {side: sum(cpu_seconds_ns(pid) for pid in pids[side]) for side in SIDES}
        redis_before = {side: redis_counters(stack.clients[side]) for side in SIDES}
        time.sleep(idle_s)
        cpu_after = {side: sum(cpu_seconds_ns(pid) for pid in pids[side]) for side in SIDES}
        redis_after = {side: redis_counters(stack.clients[side]) for side in SIDES}
        idle = {
            side: {
                "cpu_ms": 1000 * (cpu_after[side] - cpu_before[side]),
                "redis_commands": redis_delta(redis_before[side], redis_after[side]),
            }
            for side in SIDES
        }
        latencies: dict[str, list[float]] = {side: [] for side in SIDES}
        stack.receiver.clear()
        count = 0
        last_arrival = {side: time.monotonic() for side in SIDES}
        for i in range(samples):
            for side in _order(i):
                # Each side's workers have been idle for at least pause_s since its own previous message.
                time.sleep(max(0.0, last_arrival[side] + pause_s - time.monotonic()))
                path = f"/pickup/{rep}/{side}/{i}"
                url = stack.receiver.url(path)
                # From the call, not its return: ours' wake-up is published inside the enqueue, so on a busy
                # machine the worker can POST before send() has returned to us (a negative latency otherwise).
                sent = time.monotonic()
                stack.callback_actor[side].send(callback_url=url, **PAYMENT)
                arrived = stack.receiver.wait_for(count + 1, timeout_s=10)[count]
                count += 1
                if arrived.path != path:
                    raise RuntimeError(f"expected {path} at the receiver, got {arrived.path}")
                latencies[side].append(1000 * (arrived.at - sent))
                last_arrival[side] = arrived.at
    finally:
        for worker in workers.values():
            worker.stop(timeout_s=15)  # gracefully: a SIGKILL resets the receiver's keep-alive connections noisily
    return {"idle": idle, "latency_ms": latencies}


def email_run(stack: Stack, side: str, *, payments: int) -> dict[str, Any]:
    """Enqueue payments (two emails each), start side's worker (1 x 8), time the SMTP sink receiving them all."""
    stack.flush(side)
    stack.smtp.reset()
    actor = stack.email_actor[side]
    for i in range(payments):
        actor.send(
            buyer_email=f"buyer{i}@example.com", merchant_email=f"merchant{i}@example.com", plan="pro",
            saas_name="Acme Cloud",
        )  # fmt: skip
    worker = stack.worker(side, "emailQueue", processes=1, threads=8)
    worker.start(wait_ready=False)
    want = 2 * payments
    try:
        wait_for(
            lambda: len(stack.smtp.arrivals) >= want or not worker.running(),
            timeout_s=60 + want / 20, what=f"{side}: {want} emails", every_s=0.02,
        )  # fmt: skip
        if len(stack.smtp.arrivals) < want:
            raise RuntimeError(f"{side}: worker exited after {len(stack.smtp.arrivals)} emails; log: {worker.log_path}")
        arrivals = sorted(stack.smtp.arrivals)
        connections = stack.smtp.connections
        wait_for(lambda: stack.unacked(side, "emailQueue") == 0, timeout_s=20, what=f"{side}: every email acked")
    finally:
        _stop(worker)
    stack.flush(side)
    return {"emails_per_s": (want - 1) / max(arrivals[-1] - arrivals[0], 1e-3), "smtp_connections": connections}


def measure_smtp_rate(stack: Stack, *, seconds: float) -> float:
    """Return the SMTP sink's own rate, in messages per second, loaded by `bench.load smtp` (8 threads)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", "smtp", f"{stack.smtp.host}:{stack.smtp.port}", str(seconds), "8"],
        cwd=str(REPO_ROOT), capture_output=True, text=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    stack.smtp.reset()
    return float(out.stdout.strip())


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Results:
    """Everything one run measured, ready for JSON."""

    meta: dict[str, Any]
    sink: dict[str, Any] = field(default_factory=dict)
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)


def compare(
    unit: str, ours: list[float], bare: list[float], *, target: str, met: bool | None, note: str = ""
) -> dict[str, Any]:
    """Return one benchmark's entry: both sides' summaries, the ratio of the medians, the target and the verdict."""
    entry: dict[str, Any] = {
        "unit": unit, "ours": summary(ours), "bare": summary(bare), "target": target, "met": met, "note": note,
    }  # fmt: skip
    bare_median = entry["bare"]["median"]
    entry["ratio"] = entry["ours"]["median"] / bare_median if bare_median else None
    return entry


def format_figure(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def line(name: str, entry: dict[str, Any]) -> str:
    """Return the one printed line of a benchmark's figures."""
    ours, bare, fig = entry["ours"], entry["bare"], format_figure
    ratio = entry.get("ratio")
    verdict = {True: "MET", False: "MISSED", None: "-"}[entry["met"]]
    share = entry.get("share_of_limit")
    of_limit = f"  of limit {share['ours']:.0%}/{share['bare']:.0%}" if share else ""
    return (
        f"{name:<24} {entry['unit']:<8} ours {fig(ours['median']):>7} [{fig(ours['min'])}..{fig(ours['max'])}]"
        f"  bare {fig(bare['median']):>7} [{fig(bare['min'])}..{fig(bare['max'])}]"
        f"  ratio {'n/a' if ratio is None else f'{ratio:.2f}'}{of_limit}  target {entry['target']}  {verdict}"
    )


def machine() -> dict[str, Any]:
    """Return what the figures depend on: cores, CPU, Python, Redis, Dramatiq and client versions, commit."""
    import dramatiq

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor() or "unknown",
    )
    server = subprocess.run(
        [RedisServer()._command()[0], "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": next((p.removeprefix("v=") for p in server if p.startswith("v=")), "unknown"),
        "dramatiq": dramatiq.__version__,
        "redis_py": redis.__version__,
        "requests": importlib.metadata.version("requests"),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def run(sizes: Sizes, *, sink: str, command: str, progress: bool = True) -> Results:
    """Run the selected benchmarks and return their results.

    Parameters:
        sizes: what to run and how much.
        sink: "nginx" or "python" (the fallback sink).
        command: the command line, recorded in the results.
        progress: print one line per finished step to stderr.
    """

    def say(text: str) -> None:
        if progress:
            print(f"  [{time.monotonic() - t0:6.1f} s] {text}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    stack = Stack(sizes, sink=sink)
    failed = True
    results = Results(meta={
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "sizes": asdict(sizes),
        "queue_prefetch": sizes.prefetch or "dramatiq default (threads x 2)",
        "brokers": stack.broker_class,
        "workdir": stack.workdir,
        "bytecode": "both sides from bytecode: compiled once into the work folder's PYTHONPYCACHEPREFIX",
    })  # fmt: skip
    try:
        rate: SinkRate = measure_sink_rate(stack.sink, seconds=sizes.sink_rate_s)
        results.sink = {"kind": stack.sink.kind, "server": stack.sink.version(), "requests_per_s": rate.requests_per_s,
                        "load": rate.tool}  # fmt: skip
        say(f"sink {stack.sink.kind}: {rate.requests_per_s:,.0f} req/s")
        if stack.slow_sink is not None:
            # Its rate is bounded by connections / delay: load it with 1,000 connections (limit 10,000 req/s).
            slow_rate = measure_sink_rate(stack.slow_sink, seconds=sizes.sink_rate_s, connections=1000)
            results.sink["slow"] = {
                "kind": stack.slow_sink.kind, "server": stack.slow_sink.version(),
                "requests_per_s": slow_rate.requests_per_s, "load": slow_rate.tool,
                "delay_ms": sizes.slow_delay_ms, "addresses": len(stack.slow_sink.hosts),
            }  # fmt: skip
            say(f"slow sink: {slow_rate.requests_per_s:,.0f} req/s")
        wanted = set(sizes.benchmarks)
        if "enqueue" in wanted:
            runs: dict[str, list[float]] = {side: [] for side in SIDES}
            for rep in range(sizes.reps):
                for side in _order(rep):
                    runs[side].append(enqueue_run(stack, side, n=sizes.enqueue, tag=f"enq{rep}"))
            results.benchmarks["enqueue"] = compare(
                "send/s", runs["ours"], runs["bare"], target=">= 0.80x bare",
                met=None, note=f"{sizes.enqueue} send() calls in one process, no worker running",
            )  # fmt: skip
            say("enqueue done")
        drains: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
        if "throughput" in wanted:
            for rep in range(sizes.reps):
                for processes, threads in sizes.configs:
                    for side in _order(rep):
                        figures = drain_run(stack, side, n=sizes.callbacks, processes=processes, threads=threads,
                                            tag=f"tp{rep}-{processes}x{threads}-{side}")  # fmt: skip
                        drains.setdefault((processes, threads), {s: [] for s in SIDES})[side].append(figures)
                        say(f"throughput {processes}x{threads} {side}: {figures['msg_per_s']:,.0f} msg/s")
            for (processes, threads), by_side in drains.items():
                name = f"throughput_{processes}x{threads}"
                results.benchmarks[name] = compare(
                    "msg/s", [f["msg_per_s"] for f in by_side["ours"]], [f["msg_per_s"] for f in by_side["bare"]],
                    target=">= 0.90x bare", met=None,
                    note=f"{sizes.callbacks} callbacks pre-enqueued, first to last arrival at the sink",
                )  # fmt: skip
                results.benchmarks[name]["cpu_ms_per_msg"] = {
                    side: summary([f["cpu_ms_per_msg"] for f in by_side[side]]) for side in SIDES
                }
                results.benchmarks[name]["enqueue_per_s_while_filling"] = {
                    side: summary([f["enqueue_per_s"] for f in by_side[side]]) for side in SIDES
                }
                results.benchmarks[name]["launch_to_first_post_s"] = {
                    side: summary([f["launch_to_first_post_s"] for f in by_side[side]]) for side in SIDES
                }
            one_proc = [cfg for cfg in drains if cfg[0] == 1]
            if one_proc:
                cfg = (1, 8) if (1, 8) in drains else one_proc[0]
                results.benchmarks["memory"] = compare(
                    "MiB", [f["peak_rss_mib"][0] for f in drains[cfg]["ours"]],
                    [f["peak_rss_mib"][0] for f in drains[cfg]["bare"]], target="report", met=None,
                    note=f"VmHWM of the one worker process of each {cfg[0]}x{cfg[1]} throughput run, before it stops",
                )  # fmt: skip
        if "plot" in wanted:
            points: dict[int, dict[str, list[float]]] = {t: {s: [] for s in SIDES} for t in sizes.plot_threads}
            for rep in range(sizes.reps):
                for threads in sizes.plot_threads:
                    for side in _order(rep):
                        figures = drain_run(stack, side, n=sizes.plot_callbacks, processes=1, threads=threads,
                                            tag=f"plot{rep}-{threads}-{side}")  # fmt: skip
                        points[threads][side].append(figures["msg_per_s"])
                say(f"plot repetition {rep + 1}/{sizes.reps} done")
            results.benchmarks["threads"] = {
                "unit": "msg/s",
                "note": f"1 process, {sizes.plot_callbacks} callbacks per point",
                "points": {str(t): {s: summary(points[t][s]) for s in SIDES} for t in sizes.plot_threads},
            }
        slow_runs: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
        for kind in ("slow", "many"):
            if kind not in wanted:
                continue
            assert stack.slow_sink is not None
            hosts = stack.merchant_hosts if kind == "many" else ("127.0.0.1",)
            by_config: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
            for rep in range(sizes.reps):
                for processes, threads in sizes.slow_configs:
                    for side in _order(rep):
                        figures = drain_run(
                            stack, side, n=sizes.slow_callbacks, processes=processes, threads=threads,
                            tag=f"{kind}{rep}-{processes}x{threads}-{side}", sink=stack.slow_sink, hosts=hosts,
                        )  # fmt: skip
                        by_config.setdefault((processes, threads), {s: [] for s in SIDES})[side].append(figures)
                        say(f"{kind} {processes}x{threads} {side}: {figures['msg_per_s']:,.0f} msg/s, "
                            f"{figures['cpu_ms_per_msg']:.2f} ms CPU/msg, first POST "
                            f"{figures['launch_to_first_post_s']:.2f} s"
                            + (f", {figures['deferred']} deferred" if figures["deferred"] else ""))  # fmt: skip
            if kind == "slow":
                slow_runs = by_config
            where = "one merchant (127.0.0.1)" if kind == "slow" else f"{len(hosts)} merchants ({hosts[0]}..)"
            note = f"{sizes.slow_callbacks} callbacks pre-enqueued to {where}, answer after {sizes.slow_delay_ms:g} ms"
            for (processes, threads), by_side in by_config.items():
                entries = slow_entries(kind, processes, threads, by_side, delay_ms=sizes.slow_delay_ms, note=note)
                results.benchmarks.update(entries)
        if "slowplot" in wanted:
            assert stack.slow_sink is not None
            procs = sizes.slow_plot_processes
            slow_points: dict[int, dict[str, list[float]]] = {
                t: {s: [] for s in SIDES} for t in sizes.slow_plot_threads
            }
            counts: dict[int, int] = {}
            for threads in sizes.slow_plot_threads:
                reused = slow_runs.get((procs, threads))
                if reused:  # the same run as a table row: take its figures
                    counts[threads] = sizes.slow_callbacks
                    for side in SIDES:
                        slow_points[threads][side] = [f["msg_per_s"] for f in reused[side]]
                else:  # scaled so that a point takes about slow_plot_s at the limit rate
                    limit = procs * threads / (sizes.slow_delay_ms / 1000)
                    counts[threads] = max(40, min(sizes.slow_callbacks, round(limit * sizes.slow_plot_s)))
            for rep in range(sizes.reps):
                for threads in sizes.slow_plot_threads:
                    if (procs, threads) in slow_runs:
                        continue
                    for side in _order(rep):
                        figures = drain_run(stack, side, n=counts[threads], processes=procs, threads=threads,
                                            tag=f"splot{rep}-{threads}-{side}", sink=stack.slow_sink)  # fmt: skip
                        slow_points[threads][side].append(figures["msg_per_s"])
                say(f"slow plot repetition {rep + 1}/{sizes.reps} done")
            results.benchmarks["slow_threads"] = {
                "unit": "msg/s",
                "note": f"{procs} processes, sink answering after {sizes.slow_delay_ms:g} ms",
                "delay_ms": sizes.slow_delay_ms,
                "processes": procs,
                "callbacks": {str(t): counts[t] for t in sizes.slow_plot_threads},
                "points": {
                    str(t): {
                        **{s: summary(slow_points[t][s]) for s in SIDES},
                        "limit": procs * t / (sizes.slow_delay_ms / 1000),
                    }
                    for t in sizes.slow_plot_threads
                },
            }
        if "pickup" in wanted:
            reps = [
                pickup_rep(stack, rep=rep, samples=sizes.pickup_samples, pause_s=sizes.pickup_pause_s,
                           idle_s=sizes.idle_s, settle_s=sizes.settle_s)
                for rep in range(sizes.reps)
            ]  # fmt: skip
            say("pickup done")
            pcts = {side: [percentiles(r["latency_ms"][side]) for r in reps] for side in SIDES}
            for q, limit in (("p50", 10.0), ("p95", None), ("p99", 50.0)):
                ours_q = [p[q] for p in pcts["ours"]]
                results.benchmarks[f"pickup_{q}"] = compare(
                    "ms", ours_q, [p[q] for p in pcts["bare"]],
                    target=f"ours <= {limit:g} ms" if limit else "report",
                    met=(statistics.median(ours_q) <= limit) if limit else None,
                    note=f"{sizes.pickup_samples} messages per side per repetition, >= {sizes.pickup_pause_s * 1000:g}"
                    " ms idle before each; arrival at the receiver - send() called",
                )  # fmt: skip
            pooled = {side: [x for r in reps for x in r["latency_ms"][side]] for side in SIDES}
            results.benchmarks["pickup_p50"]["pooled"] = {side: percentiles(pooled[side]) for side in SIDES}
            results.benchmarks["pickup_p50"]["samples_ms"] = pooled
            cpu = {side: [r["idle"][side]["cpu_ms"] for r in reps] for side in SIDES}
            cmds = {side: [float(r["idle"][side]["redis_commands"].get("total", 0)) for r in reps] for side in SIDES}
            results.benchmarks["idle_cpu"] = compare(
                f"ms/{sizes.idle_s:g}s", cpu["ours"], cpu["bare"], target="<= 1.00x bare (not raised)",
                met=statistics.median(cpu["ours"]) <= statistics.median(cpu["bare"]),
                note="CPU of the worker processes (1 x 8) while idle, from /proc/PID/task/*/schedstat (ns)",
            )  # fmt: skip
            results.benchmarks["idle_redis"] = compare(
                f"cmd/{sizes.idle_s:g}s", cmds["ours"], cmds["bare"], target="<= 1.00x bare (not raised)",
                met=statistics.median(cmds["ours"]) <= statistics.median(cmds["bare"]),
                note="commands the idle workers sent to their Redis (INFO total_commands_processed delta)",
            )  # fmt: skip
            results.benchmarks["idle_redis"]["by_command"] = {
                side: [r["idle"][side]["redis_commands"] for r in reps] for side in SIDES
            }
        if "email" in wanted:
            results.sink["smtp_messages_per_s"] = measure_smtp_rate(stack, seconds=max(1.0, sizes.sink_rate_s))
            say(f"smtp sink: {results.sink['smtp_messages_per_s']:,.0f} msg/s")
            emails: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
            for rep in range(sizes.reps):
                for side in _order(rep):
                    emails[side].append(email_run(stack, side, payments=sizes.payments))
                    say(f"email {side}: {emails[side][-1]['emails_per_s']:,.0f} emails/s")
            results.benchmarks["email"] = compare(
                "email/s", [e["emails_per_s"] for e in emails["ours"]], [e["emails_per_s"] for e in emails["bare"]],
                target="report (ours reuses connections)", met=None,
                note=f"{sizes.payments} payments = {2 * sizes.payments} emails, 1 x 8, first to last arrival",
            )  # fmt: skip
            results.benchmarks["email"]["smtp_connections"] = {
                side: [e["smtp_connections"] for e in emails[side]] for side in SIDES
            }
        _judge(results)
        failed = False
    finally:
        results.meta["duration_s"] = round(time.monotonic() - t0, 1)
        stack.close(keep_logs=failed)
        if failed:
            print(f"bench: worker logs kept in {stack.workdir}", file=sys.stderr)
    return results


#: Ratio targets (ours / bare of the medians) of issue 14, by benchmark name: (comparison, bound).
RATIO_TARGETS: dict[str, tuple[str, float]] = {
    "enqueue": (">=", 0.95),
    "throughput_1x8": (">=", 1.10),
    "throughput_2x8": (">=", 1.10),
    "slow_2x64": (">=", 1.00),
    "slow_2x128": (">=", 1.10),
    "many_2x64": (">=", 1.00),
    "many_2x128": (">=", 1.10),
}

#: The least share of the limit (processes x threads / delay) ours must reach, by benchmark name.
SHARE_TARGETS = {"slow_2x64": 0.90, "many_2x64": 0.90}

#: Worker CPU per delivered webhook: ours / bare at most this.
CPU_RATIO_MAX = 0.85

#: Peak RSS per worker process: ours at most bare + this, in MiB.
RSS_EXTRA_MAX_MIB = 5.0

#: Launch to first POST: ours at most bare + this, in seconds.
LAUNCH_EXTRA_MAX_S = 0.1


def slow_entries(
    kind: str, processes: int, threads: int, by_side: dict[str, list[dict[str, Any]]], *, delay_ms: float, note: str
) -> dict[str, dict[str, Any]]:
    """Return the entries of one slow-sink (or many-merchants) config: throughput, CPU, RSS, launch to first POST.

    Parameters:
        kind: "slow" or "many".
        by_side: each side's drain_run figures, one per repetition.
        delay_ms: the sink's answer delay, for the limit (processes x threads / delay).
    """
    name = f"{kind}_{processes}x{threads}"
    limit = processes * threads / (delay_ms / 1000)
    runs = {side: [f["msg_per_s"] for f in by_side[side]] for side in SIDES}
    entry = compare("msg/s", runs["ours"], runs["bare"], target="report", met=None, note=note)
    entry["limit_msg_per_s"] = limit
    entry["deferred"] = {side: [f["deferred"] for f in by_side[side]] for side in SIDES}
    entry["share_of_limit"] = {side: entry[side]["median"] / limit for side in SIDES}
    cpu = {side: [f["cpu_ms_per_msg"] for f in by_side[side]] for side in SIDES}
    rss = {side: [max(f["peak_rss_mib"]) for f in by_side[side]] for side in SIDES}
    launch = {side: [f["launch_to_first_post_s"] for f in by_side[side]] for side in SIDES}
    cpu_entry = compare(
        "ms/msg", cpu["ours"], cpu["bare"], target=f"<= {CPU_RATIO_MAX:.2f}x bare", met=None,
        note="worker CPU (utime + stime of the worker processes) from the first arrival to the last, per webhook",
    )  # fmt: skip
    cpu_entry["met"] = cpu_entry["ratio"] is not None and cpu_entry["ratio"] <= CPU_RATIO_MAX
    cpu_entry["master_cpu_ms_per_msg"] = {
        side: summary([f["master_cpu_ms_per_msg"] for f in by_side[side]]) for side in SIDES
    }
    rss_entry = compare(
        "MiB", rss["ours"], rss["bare"], target=f"<= bare + {RSS_EXTRA_MAX_MIB:g} MiB", met=None,
        note=f"VmHWM of the larger of the {processes} worker processes, read after the last arrival",
    )  # fmt: skip
    rss_entry["met"] = rss_entry["ours"]["median"] <= rss_entry["bare"]["median"] + RSS_EXTRA_MAX_MIB
    launch_entry = compare(
        "s", launch["ours"], launch["bare"], target=f"<= bare + {LAUNCH_EXTRA_MAX_S:g} s", met=None,
        note="from spawning `python -m dramatiq` (queue already full) to the sink logging the first POST",
    )  # fmt: skip
    launch_entry["met"] = launch_entry["ours"]["median"] <= launch_entry["bare"]["median"] + LAUNCH_EXTRA_MAX_S
    return {name: entry, f"{name}_cpu": cpu_entry, f"{name}_rss": rss_entry, f"{name}_launch": launch_entry}


def _judge(results: Results) -> None:
    """Fill in `met` for the ratio targets, and how many times the fastest worker run the sink's rate is."""
    for name, (op, bound) in RATIO_TARGETS.items():
        entry = results.benchmarks.get(name)
        if not entry or entry.get("ratio") is None:
            continue
        met = entry["ratio"] >= bound if op == ">=" else entry["ratio"] <= bound
        entry["target"] = f"{op} {bound:.2f}x bare"
        share = SHARE_TARGETS.get(name)
        if share is not None:
            entry["target"] += f", ours >= {share:.0%} of the limit"
            met = met and entry["share_of_limit"]["ours"] >= share
        entry["met"] = met
    memory = results.benchmarks.get("memory")
    if memory:
        memory["target"] = f"<= bare + {RSS_EXTRA_MAX_MIB:g} MiB"
        memory["met"] = memory["ours"]["median"] <= memory["bare"]["median"] + RSS_EXTRA_MAX_MIB
    fastest = [
        run for name, entry in results.benchmarks.items() if name.startswith("throughput_")
        for side in SIDES for run in entry[side]["runs"]
    ]  # fmt: skip
    for entry in results.benchmarks.get("threads", {}).get("points", {}).values():
        fastest += [run for side in SIDES for run in entry[side]["runs"]]
    if fastest and results.sink:
        results.sink["fastest_worker_run_msg_per_s"] = max(fastest)
        results.sink["headroom_x"] = results.sink["requests_per_s"] / max(fastest)
    slow = [
        run for entry in results.benchmarks.values() if "limit_msg_per_s" in entry
        for side in SIDES for run in entry[side]["runs"]
    ]  # fmt: skip
    for entry in results.benchmarks.get("slow_threads", {}).get("points", {}).values():
        slow += [run for side in SIDES for run in entry[side]["runs"]]
    if slow and "slow" in results.sink:
        results.sink["slow"]["fastest_worker_run_msg_per_s"] = max(slow)
        results.sink["slow"]["headroom_x"] = results.sink["slow"]["requests_per_s"] / max(slow)


def plot(results: Results, path: Path) -> bool:
    """Draw throughput against threads per process (ours and bare, median with min-max bars) into path.

    One panel per sink that has a threads series: the fast sink (1 process) and the 100 ms sink (2 processes,
    with the limit processes x threads / delay drawn as a dotted line).
    """
    series = [results.benchmarks[name] for name in ("threads", "slow_threads") if name in results.benchmarks]
    if not series:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("bench: matplotlib is missing, no plot (install the bench extra: pip install -e '.[bench]')",
              file=sys.stderr)  # fmt: skip
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(6.2 * len(series), 4.4), dpi=110, squeeze=False)
    for ax, threads in zip(axes[0], series, strict=True):
        xs = sorted(int(t) for t in threads["points"])
        for side, style in (("ours", "o-"), ("bare", "s--")):
            med = [threads["points"][str(x)][side]["median"] for x in xs]
            low = [m - threads["points"][str(x)][side]["min"] for x, m in zip(xs, med, strict=True)]
            high = [threads["points"][str(x)][side]["max"] - m for x, m in zip(xs, med, strict=True)]
            label = "ours (actors, whole pipeline)" if side == "ours" else "bare Dramatiq (RedisBroker + requests)"
            ax.errorbar(xs, med, yerr=[low, high], fmt=style, capsize=4, label=label)
        if "delay_ms" in threads:
            ax.plot(xs, [threads["points"][str(x)]["limit"] for x in xs], ":", color="grey",
                    label="limit: processes x threads / delay")  # fmt: skip
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:,.0f}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"threads per worker process ({threads['processes']} processes)")
            ax.set_title(f"sink answering after {threads['delay_ms']:g} ms", fontsize=9)
        else:
            ax.set_ylim(bottom=0)
            ax.set_xlabel("threads per worker process (1 process)")
            ax.set_title(f"fast sink ({results.sink.get('kind', '?')}, ~0.1 ms)", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylabel("webhooks delivered per second")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    machine_info = results.meta["machine"]
    fig.suptitle(
        f"Webhook throughput vs threads (median, min-max of {results.meta['sizes']['reps']})\n"
        f"{machine_info['nproc']} cores, Python {machine_info['python']}, dramatiq {machine_info['dramatiq']}, "
        f"prefetch {results.meta['queue_prefetch']}",
        fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


#: The command-line options that set the Sizes field of the same name as they are.
_NUMBER_OPTIONS = (
    "reps", "callbacks", "plot_callbacks", "enqueue", "pickup_samples", "payments", "prefetch", "slow_callbacks",
    "slow_delay_ms", "merchants",
)  # fmt: skip


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Sizes, str]:
    """Parse the command line into options, sizes and the run's mode ("full", "quick" or "custom")."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of every benchmark, small, < 60 s")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--reps", type=int, help="repetitions per comparison (default 3)")
    parser.add_argument("--callbacks", type=int, help="messages per throughput run (default 5000)")
    parser.add_argument("--configs", help="processes x threads of the throughput runs (default 1x8,2x8)")
    parser.add_argument("--plot-threads", help="threads per process of the plot (default 1,2,4,8,16)")
    parser.add_argument("--plot-callbacks", type=int, help="messages per plot point (default 1000)")
    parser.add_argument("--enqueue", type=int, help="send() calls per enqueue run (default 5000)")
    parser.add_argument("--pickup-samples", type=int, help="messages per side per pickup repetition (default 200)")
    parser.add_argument("--pickup-pause-ms", type=float, help="idle time before each pickup message (default 200)")
    parser.add_argument("--idle-s", type=float, help="idle CPU / Redis window in seconds (default 10)")
    parser.add_argument("--payments", type=int, help="payments per email run, 2 emails each (default 1000)")
    parser.add_argument("--prefetch", type=int, help="dramatiq_queue_prefetch for both sides (default: Dramatiq's)")
    parser.add_argument("--slow-configs", help="processes x threads of the slow and many runs (default 2x64,2x128)")
    parser.add_argument("--slow-callbacks", type=int, help="messages per slow / many run (default 2000)")
    parser.add_argument("--slow-delay-ms", type=float, help="the slow sink's answer delay (default 100)")
    parser.add_argument("--merchants", type=int, help="addresses of the many-merchants runs (default 100)")
    parser.add_argument("--slow-plot-threads", help="threads per process of the slow plot (default 1,8,32,64,128)")
    parser.add_argument("--sink", choices=("nginx", "python"), default="nginx", help="HTTP sink (default nginx)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<mode>.json)")
    parser.add_argument("--plot", type=Path, help="plot PNG (default bench/throughput_threads.png for a full run)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    changes: dict[str, Any] = {}
    for name in _NUMBER_OPTIONS:
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.idle_s is not None:
        changes["idle_s"] = args.idle_s
    if args.pickup_pause_ms is not None:
        changes["pickup_pause_s"] = args.pickup_pause_ms / 1000
    if args.configs:
        changes["configs"] = tuple(tuple(int(x) for x in c.split("x")) for c in args.configs.split(","))
    if args.plot_threads:
        changes["plot_threads"] = tuple(int(t) for t in args.plot_threads.split(","))
    if args.slow_configs:
        changes["slow_configs"] = tuple(tuple(int(x) for x in c.split("x")) for c in args.slow_configs.split(","))
    if args.slow_plot_threads:
        changes["slow_plot_threads"] = tuple(int(t) for t in args.slow_plot_threads.split(","))
    if args.only:
        chosen = tuple(b.strip() for b in args.only.split(",") if b.strip())
        unknown = set(chosen) - set(BENCHMARKS)
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {sorted(unknown)}; choose from {','.join(BENCHMARKS)}")
        changes["benchmarks"] = chosen
    sizes = replace(sizes, **changes)
    mode = "quick" if args.quick and not changes else "full" if not args.quick and not changes else "custom"
    if args.quick and changes:
        mode = "quick-custom"
    return args, sizes, mode


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print one line of figures per benchmark, write the JSON (and the plot)."""
    args, sizes, mode = parse_args(argv)
    command = "bench/run " + " ".join(sys.argv[1:] if argv is None else argv)
    out: Path = args.out or RESULTS_DIR / f"{mode}.json"
    plot_path: Path = args.plot or (PLOT_PATH if mode == "full" else out.with_suffix(".png"))
    print(f"bench: {mode} run, {sizes.reps} repetition(s) of {','.join(sizes.benchmarks)}", file=sys.stderr)
    results = run(sizes, sink=args.sink, command=command.strip())
    results.meta["mode"] = mode
    sink = results.sink
    print(f"{'sink':<24} {sink['kind']} ({sink['server']}): {sink['requests_per_s']:,.0f} req/s under {sink['load']}"
          + (f" = {sink['headroom_x']:.0f}x the fastest worker run" if "headroom_x" in sink else ""))  # fmt: skip
    if "slow" in sink:
        slow = sink["slow"]
        print(f"{'slow sink':<24} {slow['server']}: {slow['requests_per_s']:,.0f} req/s under {slow['load']}"
              + (f" = {slow['headroom_x']:.1f}x the fastest worker run" if "headroom_x" in slow else ""))  # fmt: skip
    if "smtp_messages_per_s" in sink:
        print(f"{'smtp sink':<24} aiosmtpd: {sink['smtp_messages_per_s']:,.0f} msg/s (8 threads reusing connections)")
    for name, entry in results.benchmarks.items():
        if name in ("threads", "slow_threads"):
            pts = entry["points"]
            fig = format_figure
            cells = "  ".join(f"{t}t {fig(pts[t]['ours']['median'])}/{fig(pts[t]['bare']['median'])}" for t in pts)
            print(f"{name + ' (ours/bare)':<24} msg/s    {cells}")
        else:
            print(line(name, entry))
    if plot(results, plot_path):
        results.meta["plot"] = str(
            plot_path.relative_to(REPO_ROOT) if plot_path.is_relative_to(REPO_ROOT) else plot_path
        )
        print(f"{'plot':<24} {results.meta['plot']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(results), indent=2) + "\n")
    from bench.report import render, update_docs  # it imports this module

    written = json.loads(out.read_text())
    table = out.with_suffix(".md")
    table.write_text(render(written) + "\n")
    print(f"{'results':<24} {out}, {table.name}  ({results.meta['duration_s']:.0f} s)")
    if mode == "full" and args.out is None:
        # The full run is the one the docs quote: its tables and verdicts go into them as they are.
        for doc in update_docs(written, benchmarks_md=REPO_ROOT / "BENCHMARKS.md", readme=REPO_ROOT / "README.md"):
            print(f"{'updated':<24} {doc.relative_to(REPO_ROOT)}")
    return 0
