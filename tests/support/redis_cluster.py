"""A real 3-node Redis Cluster for tests: three redis-server processes on free ports (never 6379),
their slots spread over the three by ``redis-cli --cluster create``, no replicas.

A cluster node also listens on its port + 10000 (the cluster bus), so ports are picked where
both are free. ``flush()`` empties every node; ``stop()`` ends them all.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from tests.support.redis import RedisServer

NODES = 3
BUS_PORT_OFFSET = 10000
# Below the usual ephemeral range (32768-60999), so neither a node nor its bus port meets a
# port the system hands out to outgoing connections meanwhile.
PORT_RANGE = (16000, 22000)
START_TIMEOUT = 20.0


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A port free with its bus port, and apart from those in ``taken`` (and their bus ports)."""
    while True:
        port = random.randrange(*PORT_RANGE)
        bus = port + BUS_PORT_OFFSET
        if {port, bus} & taken or {port, bus} & {p + BUS_PORT_OFFSET for p in taken}:
            continue
        if _is_free(port) and _is_free(bus):
            return port


class RedisClusterServers:
    def __init__(self, directory: Path) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (apt-get install -y redis-tools)")
        self.cli = cli
        self.directory = directory
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisClusterServers:
        try:
            ports: set[int] = set()
            for index in range(NODES):
                port = free_cluster_port(ports)
                ports.add(port)
                options = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                node = RedisServer(self.directory / f"node{index}", port=port, options=options)
                self.nodes.append(node.start())
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=START_TIMEOUT,
            )
            self._wait_until_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(self._state_of(node) == "ok" for node in self.nodes):
            if time.monotonic() > deadline:
                states = {node.port: self._state_of(node) for node in self.nodes}
                raise RuntimeError(f"the Redis Cluster did not come up: {states}")
            time.sleep(0.05)

    @staticmethod
    def _state_of(node: RedisServer) -> str:
        with redis.Redis(port=node.port, socket_timeout=5) as client:
            return str(client.cluster("info")["cluster_state"])

    def node_of(self, key: str) -> int:
        """The port of the node that holds ``key``."""
        with redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5) as cluster:
            return int(cluster.get_node_from_key(key).port)

    def flush(self) -> None:
        for node in self.nodes:
            with redis.Redis(port=node.port, socket_timeout=5) as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
