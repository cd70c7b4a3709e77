"""Tests of the local dev/test servers in whiskypay.devstack (no ``actors`` import here)."""

from __future__ import annotations

import json
import smtplib
import textwrap
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis
import requests

from whiskypay.devstack import (
    HttpReceiver,
    Received,
    RedisServer,
    Response,
    SmtpSink,
    WorkerProcess,
    ensure_redis,
    find_redis_server,
    free_port,
    redis_answers,
)

# --------------------------------------------------------------------------------------------------------------------
# HttpReceiver
# --------------------------------------------------------------------------------------------------------------------


def test_receiver_records_body_and_headers(receiver: HttpReceiver) -> None:
    payload = {"id": "pay_1", "amount": 1250}
    resp = requests.post(
        receiver.url("/hook?x=1"), json=payload, headers={"X-WhiskyPay-Signature": "v1,abc"}, timeout=5
    )
    assert resp.status_code == 200
    got = receiver.wait_for(1, path="/hook")
    assert len(got) == 1
    req = got[0]
    assert isinstance(req, Received)
    assert req.method == "POST"
    assert req.path == "/hook?x=1"
    assert req.headers["x-whiskypay-signature"] == "v1,abc"
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.body) == payload
    assert req.json() == payload
    assert receiver.requests("/other") == []
    requests.put(receiver.url("/put"), data=b"\x00\x01raw", timeout=5)
    requests.get(receiver.url("/get"), timeout=5)
    assert [(r.method, r.body) for r in receiver.requests()][1:] == [("PUT", b"\x00\x01raw"), ("GET", b"")]
    receiver.clear()
    assert receiver.requests() == []


def test_receiver_scripted_responses_in_order_last_repeats(receiver: HttpReceiver) -> None:
    receiver.respond(
        "/hook",
        Response(503, body=b"busy"),
        Response(500),
        Response(201, headers={"X-Thing": "yes"}, body=b"created"),
    )
    with requests.Session() as session:  # keep-alive connection reuse must work too
        got = [session.post(receiver.url(), data=b"{}", timeout=5) for _ in range(5)]
    assert [r.status_code for r in got] == [503, 500, 201, 201, 201]
    assert got[0].text == "busy"
    assert got[-1].headers["X-Thing"] == "yes"
    assert got[-1].content == b"created"
    # Other paths keep the default.
    assert requests.post(receiver.url("/elsewhere"), timeout=5).status_code == 200

    receiver.set_handler("/dyn", lambda r: Response(200 if r.body == b"ok" else 422))
    assert requests.post(receiver.url("/dyn"), data=b"ok", timeout=5).status_code == 200
    assert requests.post(receiver.url("/dyn"), data=b"no", timeout=5).status_code == 422


def test_receiver_delay_does_not_block_other_requests(receiver: HttpReceiver) -> None:
    receiver.respond("/slow", Response(200, delay_s=1.5))
    slow_status: list[int] = []
    thread = threading.Thread(
        target=lambda: slow_status.append(requests.post(receiver.url("/slow"), timeout=5).status_code)
    )
    thread.start()
    receiver.wait_for(1, path="/slow", timeout_s=5)
    t0 = time.monotonic()
    assert requests.post(receiver.url("/fast"), timeout=5).status_code == 200
    assert time.monotonic() - t0 < 1.0
    thread.join(5)
    assert slow_status == [200]


def test_receiver_read_timeout_and_stop_do_not_hang() -> None:
    rcv = HttpReceiver().start()
    rcv.respond("/hang", Response(200, delay_s=30))
    with pytest.raises(requests.ReadTimeout):
        requests.post(rcv.url("/hang"), data=b"x", timeout=(2, 0.3))
    t0 = time.monotonic()
    rcv.stop()
    assert time.monotonic() - t0 < 3


def test_receiver_ignores_a_request_cut_off_mid_body(receiver: HttpReceiver) -> None:
    # Given a client that dies after sending its headers and part of the body (a SIGKILLed worker)
    import socket

    with socket.create_connection(("127.0.0.1", receiver.port)) as sock:
        sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    # When a whole request follows, then only that one was received
    requests.post(receiver.url("/hook"), data=b"whole", timeout=5)
    assert [hit.body for hit in receiver.wait_for(1)] == [b"whole"]
    time.sleep(0.2)
    assert [hit.body for hit in receiver.requests()] == [b"whole"]


def test_receiver_wait_for_reports_what_arrived(receiver: HttpReceiver) -> None:
    requests.post(receiver.url("/a"), data=b"one", timeout=5)
    with pytest.raises(AssertionError, match="got 0"):
        receiver.wait_for(1, path="/b", timeout_s=0.2)


# --------------------------------------------------------------------------------------------------------------------
# SmtpSink
# --------------------------------------------------------------------------------------------------------------------


def _message(to: str = "alice@example.test", subject: str = "Receipt") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "payments@whiskypay.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Thanks for your payment of £12.50")
    return msg


def test_smtp_sink_receives_message(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.send_message(_message())
    (mail,) = smtp_sink.wait_for(1)
    assert mail.mail_from == "payments@whiskypay.test"
    assert mail.rcpt_tos == ("alice@example.test",)
    assert mail.message["Subject"] == "Receipt"
    assert "£12.50" in mail.message.get_content()
    assert b"Subject: Receipt" in mail.data


def test_smtp_fail_next_data_stage(smtp_sink: SmtpSink) -> None:
    smtp_sink.fail_next(1, code=451, text="4.3.0 try again later")
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPDataError) as exc_info:
            client.send_message(_message())
        assert exc_info.value.smtp_code == 451
        client.send_message(_message(subject="second"))  # n=1: the next one is accepted
    assert [m.message["Subject"] for m in smtp_sink.wait_for(1)] == ["second"]


def test_smtp_fail_next_rcpt_stage_only_for_matching_recipient(smtp_sink: SmtpSink) -> None:
    smtp_sink.fail_next(2, code=550, text="5.1.1 no such user", stage="RCPT", rcpt="bob@example.test")
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.send_message(_message(to="alice@example.test"))  # not matching: accepted, rule not consumed
        for _ in range(2):
            with pytest.raises(smtplib.SMTPRecipientsRefused) as exc_info:
                client.send_message(_message(to="bob@example.test"))
            assert exc_info.value.recipients["bob@example.test"][0] == 550
        client.send_message(_message(to="bob@example.test"))
    assert [m.rcpt_tos for m in smtp_sink.wait_for(2)] == [("alice@example.test",), ("bob@example.test",)]


def test_smtp_drop_connections(smtp_sink: SmtpSink) -> None:
    smtp_sink.drop_connections(1)
    client = smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.send_message(_message())
    client.close()
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client2:
        client2.send_message(_message())
    assert len(smtp_sink.wait_for(1)) == 1


def test_smtp_counts_connections(smtp_sink: SmtpSink) -> None:
    assert smtp_sink.connections == 0  # aiosmtpd's own start-up probe is not counted
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.send_message(_message(subject="one"))
        client.send_message(_message(subject="two"))
    assert len(smtp_sink.wait_for(2)) == 2
    assert smtp_sink.connections == 1
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.send_message(_message(subject="three"))
    assert smtp_sink.connections == 2


def test_smtp_auth_and_maildir(tmp_path: Path) -> None:
    with SmtpSink(username="mailer", password="s3cret", maildir=str(tmp_path / "mail")) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=5) as client, pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("mailer", "wrong")
        with smtplib.SMTP(sink.host, sink.port, timeout=5) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as exc_info:  # AUTH required
                client.send_message(_message())
            assert exc_info.value.smtp_code == 530
        for mechanism in ("LOGIN", "PLAIN"):
            with smtplib.SMTP(sink.host, sink.port, timeout=5) as client:
                client.ehlo()
                client.user, client.password = "mailer", "s3cret"
                client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
                client.send_message(_message(subject=mechanism))
        assert [m.message["Subject"] for m in sink.wait_for(2)] == ["LOGIN", "PLAIN"]
    files = sorted((tmp_path / "mail").glob("*.eml"))
    assert len(files) == 2
    assert b"Subject: LOGIN" in files[0].read_bytes()


# --------------------------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------------------------


def test_find_redis_server_returns_executable() -> None:
    assert Path(find_redis_server()).is_file()


def test_redis_restart_keeps_data_and_kill_then_start(private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    client.set("k", "v1")
    port = private_redis.port
    private_redis.restart()
    assert private_redis.port == port
    client = redis.Redis.from_url(private_redis.url)
    assert client.get("k") == b"v1"

    client.set("k2", "v2")  # appendfsync always: survives SIGKILL
    private_redis.kill()
    assert not redis_answers(private_redis.url, timeout_s=0.3)
    private_redis.start()
    client = redis.Redis.from_url(private_redis.url)
    assert client.mget("k", "k2") == [b"v1", b"v2"]
    client.close()


def test_redis_password_and_non_aof_restart() -> None:
    with RedisServer(password="p@ss word") as server:
        assert "p%40ss%20word@" in server.url
        assert redis_answers(server.url)
        assert not redis_answers(f"redis://127.0.0.1:{server.port}/0", timeout_s=0.5)
        redis.Redis.from_url(server.url).set("k", "v")
        server.restart()  # SHUTDOWN SAVE + reload dump.rdb
        assert redis.Redis.from_url(server.url).get("k") == b"v"
        workdir = server.workdir
    assert not Path(workdir).exists()


def test_ensure_redis_falls_back_to_private_server(redis_url: str) -> None:
    url, server = ensure_redis(redis_url)
    assert (url, server) == (redis_url, None)

    dead = f"redis://127.0.0.1:{free_port()}/0"
    url, server = ensure_redis(dead)
    try:
        assert server is not None
        assert url != dead
        assert redis_answers(url)
    finally:
        if server is not None:
            server.stop()


def test_redis_client_fixture_uses_test_db(redis_client: redis.Redis, redis_url: str) -> None:
    assert redis_client.dbsize() == 0
    redis_client.set("x", "1")
    assert redis_answers(redis_url)


# --------------------------------------------------------------------------------------------------------------------
# WorkerProcess (with a tiny stand-in module; the real ``actors`` package is exercised by e2e tests)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_actor_module(tmp_path: Path, redis_url: str) -> tuple[Path, str]:
    module = tmp_path / "tmpmod.py"
    module.write_text(
        textwrap.dedent(
            f"""
            import os
            import dramatiq
            from dramatiq.brokers.redis import RedisBroker

            broker = RedisBroker(url={redis_url!r})
            dramatiq.set_broker(broker)

            @dramatiq.actor(queue_name="devstackTestQueue", max_retries=0)
            def touch(path):
                with open(path, "a") as fh:
                    fh.write(str(os.getpid()) + "\\n")
            """
        )
    )
    return tmp_path, redis_url


@pytest.mark.e2e
def test_worker_process_start_ready_stop_kill(
    fake_actor_module: tuple[Path, str], worker_env: dict[str, str], redis_client: redis.Redis
) -> None:
    moddir, _ = fake_actor_module
    out = moddir / "touched.txt"
    worker = WorkerProcess(
        "--queues", "devstackTestQueue", env=worker_env, cwd=str(moddir), processes=2, threads=1, module="tmpmod"
    )
    worker.start(timeout_s=30)
    try:
        assert worker.running()
        assert worker.log().count("Worker process is ready for action.") == 2
        pids = worker.pids_of_workers()
        assert len(pids) >= 2

        # Enqueue from the test process through the same Redis and let the real worker run it.
        import dramatiq
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=worker_env["WHISKYPAY_REDIS_URL"])  # type: ignore[no-untyped-call]
        broker.enqueue(
            dramatiq.Message(
                queue_name="devstackTestQueue", actor_name="touch", args=(str(out),), kwargs={}, options={}
            )
        )
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.exists(), worker.log()
        assert int(out.read_text().split()[0]) in pids
        broker.close()

        assert worker.stop() is not None
        assert not worker.running()
        assert "Shutting down" in worker.log() or worker.returncode == 0

        # Restart the same object (log appended; readiness counted only for the new run), then SIGKILL the group.
        worker.start(timeout_s=30)
        pids = worker.pids_of_workers()
        worker.kill()
        assert worker.returncode == -9
        time.sleep(0.2)
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    finally:
        worker.kill()


@pytest.mark.e2e
def test_worker_process_reports_import_error(tmp_path: Path, worker_env: dict[str, str]) -> None:
    (tmp_path / "brokenmod.py").write_text("raise RuntimeError('boom at import')\n")
    worker = WorkerProcess(env=worker_env, cwd=str(tmp_path), module="brokenmod")
    with pytest.raises(RuntimeError, match="boom at import"):
        worker.start(timeout_s=20)
    worker.kill()
