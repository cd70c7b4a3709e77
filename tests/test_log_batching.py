"""LogBatching: a worker process's log lines reach the `dramatiq` master in chunks, whole, in order (issue 14)."""

from __future__ import annotations

import logging
import multiprocessing
import re
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest
from dramatiq.compat import StreamablePipe

from middleware.log_batching import BatchedPipe, LogBatching
from tests.helpers import wait_until
from whiskypay.devstack import HttpReceiver


@pytest.fixture
def pipe() -> Iterator[tuple[Connection, StreamablePipe]]:
    """A real pipe like the CLI's: the master's read end and the worker's StreamablePipe."""
    read, write = multiprocessing.Pipe(duplex=False)
    yield read, StreamablePipe(write)
    read.close()
    write.close()


def received(read: Connection, *, wait_s: float = 0.0) -> list[str]:
    """Return every message waiting on read (waiting up to wait_s for the first one)."""
    chunks = []
    if read.poll(wait_s):
        while read.poll():
            chunks.append(read.recv_bytes().decode())
    return chunks


def test_lines_from_many_threads_arrive_whole_and_in_order_in_a_few_chunks(pipe) -> None:
    # Given a batched pipe and four threads writing 200 lines each, as logging does (one write per line)
    read, write = pipe
    stream = BatchedPipe(write, interval_s=0.02)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter_until_closed(read)))
    reader.start()

    def log_lines(thread: int) -> None:
        for i in range(200):
            stream.write(f"thread={thread} line={i} {'x' * (i % 50)}\n")
            if i % 50 == 0:
                time.sleep(0.01)

    writers = [threading.Thread(target=log_lines, args=(t,)) for t in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    # When the pipe is closed (the CLI's last step)
    stream.close()
    reader.join(5)
    # Then every line arrived once, whole, each thread's in the order written, in far fewer messages than lines
    lines = "".join(chunks).splitlines()
    assert len(lines) == 800
    assert all(re.fullmatch(r"thread=\d line=\d+ x*", line) for line in lines)
    for thread in range(4):
        numbers = [int(line.split()[1][5:]) for line in lines if line.startswith(f"thread={thread} ")]
        assert numbers == list(range(200))
    assert all(chunk.endswith("\n") for chunk in chunks)
    assert len(chunks) < 100, len(chunks)
    # And what is written after the close is dropped, not raised
    assert stream.write("late\n") == 5


def iter_until_closed(read: Connection) -> Iterator[str]:
    while True:
        try:
            yield read.recv_bytes().decode()
        except EOFError:
            return


def test_an_idle_batched_pipe_sends_nothing_and_a_flush_sends_at_once(pipe) -> None:
    # Given a batched pipe with a long interval
    read, write = pipe
    stream = BatchedPipe(write, interval_s=5)
    # When a line is written, then nothing is sent yet
    stream.write("one\n")
    assert received(read, wait_s=0.1) == []
    # When it is flushed, then it is sent at once, as one message
    stream.flush()
    assert received(read, wait_s=1) == ["one\n"]
    stream.close()


@pytest.fixture
def worker_logging(pipe) -> Iterator[tuple[Connection, logging.Logger]]:
    """The root logger set up as the `dramatiq` CLI sets up a worker process's (a StreamHandler on its pipe)."""
    read, write = pipe
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = logging.StreamHandler(write)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    try:
        yield read, logging.getLogger("whiskypay.test_log_batching")
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


def test_info_lines_wait_for_the_interval_and_a_warning_takes_them_along_at_once(worker_logging) -> None:
    # Given LogBatching installed in a worker process whose lines may wait 5 s
    read, logger = worker_logging
    batching = LogBatching(interval_s=5)
    batching.after_process_boot(broker=None)  # type: ignore[arg-type]
    assert batching.stream is not None
    try:
        # When two INFO lines are logged, then neither is sent yet
        logger.info("delivered 1")
        logger.info("delivered 2")
        assert received(read, wait_s=0.1) == []
        # When a WARNING is logged, then it goes at once, with the two lines before it, in order, in one message
        logger.warning("slow merchant")
        assert received(read, wait_s=1) == ["[INFO] delivered 1\n[INFO] delivered 2\n[WARNING] slow merchant\n"]
        # When an INFO line is logged and the worker shuts down, then it is sent then
        logger.info("delivered 3")
        batching.after_worker_shutdown(broker=None, worker=None)  # type: ignore[arg-type]
        assert received(read, wait_s=1) == ["[INFO] delivered 3\n"]
    finally:
        batching.stream.close()


def test_a_process_without_dramatiqs_pipe_keeps_its_logging(worker_logging) -> None:
    # Given a process whose root handler writes elsewhere (the gateway, a test, `--skip-logging`)
    root = logging.getLogger()
    elsewhere = logging.StreamHandler()
    root.handlers = [elsewhere]
    # When LogBatching's worker hook runs, then nothing is replaced
    batching = LogBatching()
    batching.after_process_boot(broker=None)  # type: ignore[arg-type]
    assert root.handlers == [elsewhere] and batching.stream is None


@pytest.mark.e2e
def test_a_real_worker_logs_every_delivery_and_its_shutdown_whole(
    redis_client, receiver: HttpReceiver, start_workers, worker_env
) -> None:
    # Given a real `dramatiq actors` worker (two processes) batching its log lines, and 30 callbacks
    from actors import send_callback

    worker = start_workers("--queues", "callbackQueue", env={**worker_env, "WHISKYPAY_LOG_BATCH_MS": "25"},
                           processes=2, threads=4)
    for i in range(30):
        send_callback.send(callback_url=receiver.url("/hook"), email="buyer@example.com", plan="pro", price=1.0,
                           event_id=f"evt_logs_{i}")
    # When they are delivered, then the log shows one delivery line each (lines reach the log within the interval)
    receiver.wait_for(30)
    wait_until(lambda: worker.log().count(" delivered\n") == 30, timeout_s=10, what="30 delivery lines")
    # When the worker stops, then its last lines (logged after every middleware's shutdown hook) are in the log too
    worker.stop()
    log = worker.log()
    assert log.count("Worker has been shut down.") == 2
    # And every line is whole: each starts with the CLI's format, none is cut or run into another
    assert all(re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+\] \[PID \d+\] \[", line) for line in log.splitlines()), log
