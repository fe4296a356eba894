"""The node agent with its admin listener, started by the process: inside the only worker, or in
a process of its own next to several workers (process.py decides)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from apigate.admin.app import create_app
from apigate.admin.server import AdminServer
from apigate.config.models import GatewayConfig
from apigate.node.agent import NodeAgent


class NodeRuntime:
    def __init__(self, config: GatewayConfig, admin_sock: socket.socket | None) -> None:
        self.agent = NodeAgent(config)
        self.admin: AdminServer | None = None
        if admin_sock is not None and config.admin is not None:
            token = config.admin.token.get_secret_value().encode() if config.admin.token else None
            self.admin = AdminServer(create_app(self.agent, token), admin_sock)
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        self.agent.apply(self.agent.config)
        if self.admin is not None:
            self.admin.start()

    def apply(self, config: GatewayConfig) -> None:
        """A reloaded config: probes follow it (the admin listener keeps its socket and token)."""
        self.agent.apply(config)

    async def listen(self, sock: socket.socket) -> None:
        """Accept the workers' links on a Unix socket the supervisor bound."""
        self._servers.append(await asyncio.start_unix_server(self.agent.serve_worker, sock=sock))

    async def connect_here(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A link for a worker in this very process (a socket pair: the same path as the others)."""
        node_end, worker_end = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=node_end)
        task = asyncio.get_running_loop().create_task(self.agent.serve_worker(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.open_connection(sock=worker_end)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        if self.admin is not None:
            await self.admin.stop()
        await self.agent.stop()
