"""Worker liveness: the files worker processes keep, and how `whiskypay health --worker` and /healthz judge them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import TimeLimit

from middleware.worker_liveness import WorkerLiveness
from whiskypay.worker_health import WorkerBeat, assess_workers, read_beats, remove_beat, write_beat

NOW = 1_800_000_000.0


def beat(*, age_s: float = 1.0, threads: int = 2, busy: tuple[tuple[float, int], ...] = (),
         consuming: tuple[str, ...] = ("callbackQueue",), master_pid: int = 1) -> WorkerBeat:
    return WorkerBeat(pid=os.getpid(), master_pid=master_pid, at=NOW - age_s, threads=threads, busy=busy,
                      consuming=consuming)


@pytest.mark.parametrize(("beats", "healthy", "why"), [
    ([], False, "no worker process runs on this host"),
    ([beat(age_s=61)], False, "no worker heartbeat within 60 s"),
    ([beat(busy=((NOW - 700, 600_000), (NOW - 601, 600_000)))], False, "all 2 thread(s) of worker process"),
    ([beat(busy=((NOW - 700, 600_000), (NOW - 5, 600_000)))], True, "2 of 2 thread(s) busy"),  # one stuck, one working
    ([beat(busy=((NOW - 700, 900_000), (NOW - 700, 900_000)))], True, "2 of 2 thread(s) busy"),  # longer limits
    ([beat(age_s=61), beat()], True, "1 worker process(es) heartbeating"),
])
def test_a_worker_is_healthy_when_it_heartbeats_and_not_every_thread_is_stuck(
    beats: list[WorkerBeat], healthy: bool, why: str
) -> None:
    ok, line = assess_workers(beats, now=NOW, heartbeat_timeout_s=60)
    assert ok is healthy and why in line, line


def test_readiness_needs_a_running_consumer_and_the_probe_only_its_own_master() -> None:
    assert assess_workers([beat(consuming=())], now=NOW, heartbeat_timeout_s=60, need_consumers=True)[0] is False
    assert assess_workers([beat()], now=NOW, heartbeat_timeout_s=60, need_consumers=True)[0] is True
    assert assess_workers([beat(master_pid=2)], now=NOW, heartbeat_timeout_s=60, master_pid=1)[0] is False


def test_files_of_processes_that_are_gone_are_ignored(tmp_path: Path) -> None:
    write_beat(str(tmp_path), beat())
    write_beat(str(tmp_path), WorkerBeat(pid=2**22 + 12345, master_pid=1, at=NOW, threads=1))  # no such process
    (tmp_path / "garbage.json").write_text("{not json")
    assert [b.pid for b in read_beats(str(tmp_path))] == [os.getpid()]
    remove_beat(str(tmp_path), os.getpid())
    assert read_beats(str(tmp_path)) == []


def test_the_middleware_records_each_busy_thread_with_its_time_limit(tmp_path: Path) -> None:
    # Given the liveness middleware on a stub broker, with an actor whose time limit is 5 s
    broker = StubBroker(middleware=[TimeLimit()])  # it declares the time_limit option
    liveness = WorkerLiveness(state_dir=str(tmp_path), clock=lambda: NOW)
    broker.add_middleware(liveness)
    seen: list[WorkerBeat] = []

    def work() -> None:
        liveness.beat()
        seen.extend(read_beats(str(tmp_path)))

    actor = dramatiq.actor(work, broker=broker, actor_name="work", time_limit=5_000)
    proxy = MessageProxy(actor.message())
    # When a thread is processing it, then the file says one busy thread with that limit
    liveness.before_process_message(broker, proxy)
    work()
    assert seen[0].busy == ((NOW, 5_000),)
    # And once it is done, none
    liveness.after_process_message(broker, proxy)
    liveness.beat()
    assert read_beats(str(tmp_path))[0].busy == ()
    broker.close()


def test_an_unwritable_state_dir_warns_and_does_not_stop_the_worker(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    liveness = WorkerLiveness(state_dir=str(blocker / "workers"), beat_interval_s=60)
    broker = StubBroker(middleware=[])
    liveness.before_worker_boot(broker, None)  # type: ignore[arg-type]  # no exception: the worker boots
    liveness.after_worker_shutdown(broker, None)  # type: ignore[arg-type]
    broker.close()


def test_the_queue_gauges_say_redis_is_down_instead_of_reporting_zeros() -> None:
    from middleware.metrics_exporter import QueueGauge, QueueGauges

    def down() -> list[QueueGauge]:
        raise ConnectionError("Redis is gone")

    [up] = list(QueueGauges(down).collect())
    assert up.name == "whiskypay_redis_up" and up.samples[0].value == 0
    families = {family.name: family for family in QueueGauges(lambda: [QueueGauge("q", None, 3)]).collect()}
    assert families["whiskypay_redis_up"].samples[0].value == 1
    assert families["whiskypay_dead_letters"].samples[0].value == 3
    assert families["whiskypay_queue_oldest_waiting_seconds"].samples[0].value == 0


def test_a_probe_that_never_finishes_its_request_is_cut_off_instead_of_holding_a_metrics_thread() -> None:
    # Given the metrics port's handler with a short request timeout, served on loopback
    import http.server
    import socket
    import threading

    from middleware.metrics_exporter import REQUEST_TIMEOUT_S, metrics_handler

    assert 0 < REQUEST_TIMEOUT_S <= 30
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), metrics_handler(request_timeout_s=0.3))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # When a client sends half a request line and then nothing
        with socket.create_connection(server.server_address[:2], timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            # Then the server closes the connection after the timeout, not never (recv returns b"")
            assert sock.recv(100) == b""
            assert time.monotonic() - started < 3
        # And a whole request is still answered
        with socket.create_connection(server.server_address[:2], timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.0 200")
    finally:
        server.shutdown()
        server.server_close()
