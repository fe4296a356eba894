"""A real Redis behind Redis Sentinel for tests: a master, a replica and one sentinel watching them
(quorum 1), each a redis-server process on a free port (never 6379 or 26379).

``failover()`` asks the sentinel to promote the replica and waits until it names the new master
and that master takes writes, as after a real failover.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.support.redis import RedisServer

SERVICE = "apigate-test"
READY_TIMEOUT = 20.0


class RedisSentinelServers:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.master = RedisServer(directory / "master")
        self.replica: RedisServer | None = None
        self.sentinel: RedisServer | None = None

    @property
    def url(self) -> str:
        assert self.sentinel is not None
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{SERVICE}"

    def start(self) -> RedisSentinelServers:
        self.master.start()
        self.replica = RedisServer(
            self.directory / "replica", options=["--replicaof", "127.0.0.1", str(self.master.port)]
        ).start()
        config = self.directory / "sentinel.conf"  # the sentinel rewrites it as it learns
        config.write_text(
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        self.sentinel = RedisServer(self.directory / "sentinel", options=["--sentinel"], config_file=config)
        self.sentinel.start()
        seen = "the sentinel to see the replica"
        self._wait(lambda: len(self._ask("SENTINEL", "REPLICAS", SERVICE)) == 1, seen)
        return self

    def _ask(self, *command: str) -> Any:
        assert self.sentinel is not None
        try:
            with redis.Redis(port=self.sentinel.port, socket_timeout=1, socket_connect_timeout=1) as client:
                return client.execute_command(*command)
        except redis.RedisError:
            return []

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what}")
            time.sleep(0.05)

    def master_port(self) -> int:
        """The port of the master as the sentinel names it now."""
        address = self._ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        assert isinstance(address, list | tuple) and address, address
        return int(address[1])

    def failover(self) -> int:
        """Promote the replica; the new master's port, once it takes writes and the old master
        has become its replica (read-only)."""
        before = self.master_port()
        self._ask("SENTINEL", "FAILOVER", SERVICE)
        self._wait(lambda: self.master_port() != before, "the sentinel to name a new master")
        after = self.master_port()

        def takes_writes() -> bool:
            try:
                with redis.Redis(port=after, socket_timeout=1) as client:
                    return bool(client.set("failover-probe", "1"))
            except redis.RedisError:
                return False

        self._wait(takes_writes, "the new master to take writes")

        def demoted() -> bool:
            try:
                with redis.Redis(port=before, socket_timeout=1) as client:
                    return bool(client.execute_command("ROLE")[0] == b"slave")
            except redis.RedisError:
                return False

        self._wait(demoted, "the old master to become a replica")
        return after

    def flush(self) -> None:
        with redis.Redis(port=self.master_port(), socket_timeout=5) as client:
            client.flushall()

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            if server is not None:
                server.stop()
