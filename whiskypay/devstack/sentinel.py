"""Private Redis Sentinels (``redis-server --sentinel``) watching a private primary, for tests and benchmarks."""

from __future__ import annotations

import os

from whiskypay.devstack.redis_server import RedisServer, find_redis_server


class SentinelServer(RedisServer):
    """A private Redis Sentinel on 127.0.0.1 monitoring the primary at ``primary_port`` as ``master_name``.

    Parameters:
        primary_port: the monitored primary's port on 127.0.0.1.
        master_name: the name clients ask for (WHISKYPAY_REDIS_SENTINEL_MASTER).
        quorum: sentinels that must agree the primary is down.
        down_after_ms: how long the primary must not answer before it is thought down.
        failover_timeout_ms: Sentinel's failover-timeout.
        port, workdir: as RedisServer's.
    """

    def __init__(
        self, *, primary_port: int, master_name: str = "whiskypay", quorum: int = 2, down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000, port: int | None = None, workdir: str | None = None,
    ) -> None:
        super().__init__(port=port, workdir=workdir)
        self.primary_port = primary_port
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.config_path = os.path.join(self.workdir, "sentinel.conf")

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, as WHISKYPAY_REDIS_SENTINELS lists it."""
        return f"127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        # Sentinel rewrites its config file as it learns the topology, so it gets a file of its own, written once.
        if not os.path.exists(self.config_path):
            os.makedirs(self.workdir, exist_ok=True)
            name = self.master_name
            with open(self.config_path, "w") as fh:
                fh.write(
                    f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.workdir}\n"
                    f"sentinel monitor {name} 127.0.0.1 {self.primary_port} {self.quorum}\n"
                    f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {name} 1\n"
                )
        return [find_redis_server(), self.config_path, "--sentinel"]

    def __repr__(self) -> str:
        return f"SentinelServer(port={self.port}, primary_port={self.primary_port}, running={self.running()})"
