"""The engine serving a config in the test's own process, on a thread and event loop of its own.

A gateway process keeps its policies to itself; this one lets a test read what a policy counts
(``plan.routes[i].policies``) while real clients and upstreams talk to it over real sockets.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from apigate.config.compile import compile_plan
from apigate.config.loader import load_config
from apigate.engine.plan import Plan
from apigate.engine.server import Gateway

T = TypeVar("T")


class InProcessGateway:
    def __init__(self, config_text: str) -> None:
        self.config = load_config(text=config_text)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.plan: Plan | None = None
        self.gateway: Gateway | None = None
        self.failure: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            gateway = self.gateway = Gateway(loop=self.loop)
            self.plan = compile_plan(self.config, gateway.pools)
            gateway.apply(self.plan)
            self.loop.run_until_complete(gateway.serve(self.sock))
        except BaseException as exc:  # reported by start()
            self.failure = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> InProcessGateway:
        self.thread.start()
        if not self.ready.wait(10) or self.failure is not None:
            raise RuntimeError(f"the in-process gateway did not start: {self.failure!r}")
        return self

    def policy(self, route: int, name: str) -> Any:
        """The policy ``name`` of the ``route``-th route, as the engine runs it."""
        assert self.plan is not None
        return next(p for p in self.plan.routes[route].policies if p.name == name)

    def call(self, function: Callable[[Gateway], T]) -> T:
        """``function(gateway)`` run on the gateway's own loop (what it returns)."""
        gateway = self.gateway
        assert gateway is not None

        async def run() -> T:
            return function(gateway)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> InProcessGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
