"""Serve the admin API with uvicorn on a socket the process bound, inside the running loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("apigate")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process owns the signals (drain on SIGTERM, reload on SIGHUP); uvicorn must not.
        yield


class AdminServer:
    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, loop="none")
        self.server = _Server(config)
        self.sock = sock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self._task, 5)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
