"""Processes: bind the listener once, run one gateway per worker, reload on SIGHUP or file change,
drain on SIGTERM. ``Runtime`` is the one place that wires the layers together: config → compiled
plan → engine, and the services the plan's policies need.

Workers are forked children sharing the parent's listening socket; a worker whose parent is gone
(killed with SIGKILL, say) drains and exits as on SIGTERM, so no worker serves unsupervised or
keeps the port from the next `apigate run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from apigate.config.compile import compile_plan, needs_of, state_urls_of
from apigate.config.loader import ConfigError, load_config
from apigate.config.models import GatewayConfig
from apigate.engine.server import Gateway
from apigate.services import Services

log = logging.getLogger("apigate")

WATCH_INTERVAL = 1.0


@dataclass
class ConfigSource:
    """Where the config comes from, so a reload reads the same place again."""

    path: Path | None
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def load(self) -> GatewayConfig:
        if self.path is None:
            text = (Path(__file__).parent / "demo" / "example.yaml").read_text()
            return load_config(text=text, environ=self.environ)
        return load_config(self.path, environ=self.environ)

    def mtime(self) -> float:
        if self.path is None:
            return 0.0
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def run(source: ConfigSource, workers: int | None) -> int:
    """Run the gateway until SIGTERM/SIGINT; returns the process exit code."""
    demo_sock = None
    if source.path is None:
        from apigate.demo.upstream import bind_demo_socket

        demo_sock = bind_demo_socket()
        source.environ["DEMO_UPSTREAM_PORT"] = str(demo_sock.getsockname()[1])
    try:
        config = source.load()
    except ConfigError as exc:
        print(f"apigate: the config is not valid:\n{exc}", file=sys.stderr)
        return 2
    count = workers or config.workers
    try:
        sock = bind(config.listen.host, config.listen.port)
    except OSError as exc:
        print(f"apigate: cannot listen on {config.listen.host}:{config.listen.port}: {exc}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    where = f"config {source.path}" if source.path else "the embedded demo (GET /api/v1/hello)"
    print(f"apigate listening on http://{shown_host}:{port} with {count} worker(s), {where}", flush=True)
    per_process = _limits_counted_per_process(config)
    if count > 1 and per_process:
        print(
            f"apigate: rate limits on {', '.join(per_process)} count in each of the {count} workers "
            "separately (state: memory://); name a Redis in state.url to count them together",
            file=sys.stderr,
            flush=True,
        )
    if count == 1:
        return _worker(source, config, sock, demo_sock)
    return _supervise(source, config, sock, demo_sock, count)


def _limits_counted_per_process(config: GatewayConfig) -> list[str]:
    """The routes whose rate limits count in this process alone (no shared state backend)."""
    shared_state = config.state.url != "memory://"
    routes = []
    for route in config.routes:
        raw = {**config.policies, **route.policies}.get("rate-limit", False)
        if raw is False and route.rate_limit is None:
            continue
        if not shared_state or (isinstance(raw, dict) and raw.get("backend") == "memory"):
            routes.append(route.display_name)
    return routes


def _worker(
    source: ConfigSource,
    config: GatewayConfig,
    sock: socket.socket,
    demo_sock: socket.socket | None,
    parent_alive: int | None = None,
) -> int:
    """Serve until told to stop; ``parent_alive`` is the read end of the supervisor's pipe."""
    uvloop.install()
    return asyncio.run(_serve(source, config, sock, demo_sock, parent_alive))


class Runtime:
    """One worker's gateway, the shared services and the config they were built from."""

    def __init__(self, source: ConfigSource, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.gateway = Gateway(loop)
        self.services = Services()  # outlive reloads: a reload recompiles policies, not connections

    def apply(self, config: GatewayConfig) -> None:
        """Compile ``config`` and serve it; raises (and keeps the running plan) if compiling fails."""
        plan = compile_plan(config, self.gateway.pools, self.services, self.gateway.target_states)
        self.gateway.apply(plan)
        self.config = config
        for name, inactive in plan.inactive.items():
            log.warning(
                "route %s: %s not active (no such policy in this version, or the policy needs settings "
                "the shorthand cannot give: configure it under policies)",
                name,
                ", ".join(inactive),
            )

    async def start_services(self) -> None:
        """Start the shared services the current plan's policies need (before serving)."""
        plan = self.gateway.plan
        if await self.services.start(self.config, needs_of(plan), state_urls_of(plan)):
            # Compiled again with the state backend running: what /routes says of a policy (where
            # its counters live) may depend on it. Counters outlive this as they outlive a reload.
            self.apply(self.config)

    def reload(self, why: str) -> None:
        try:
            config = self.source.load()
            self.apply(config)
        except ConfigError as exc:
            log.error("reload (%s) refused, the running config stays:\n%s", why, exc)
            return
        except Exception:
            log.exception("reload (%s) failed, the running config stays", why)
            return
        self.gateway.spawn(self._start_services_after_reload())
        log.info("reloaded config (%s): %d routes", why, len(config.routes))

    async def _start_services_after_reload(self) -> None:
        try:
            await self.start_services()
        except Exception:
            log.exception("starting services after a reload failed; policies that need them answer 503")

    async def drain(self) -> None:
        timeout = self.gateway.plan.timeouts.drain
        log.info("draining (up to %.0fs)", timeout)
        await self.gateway.drain(timeout)
        await self.services.stop()


async def _serve(
    source: ConfigSource,
    config: GatewayConfig,
    sock: socket.socket,
    demo_sock: socket.socket | None,
    parent_alive: int | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    runtime = Runtime(source, loop)
    runtime.apply(config)
    await runtime.start_services()
    if demo_sock is not None:
        from apigate.demo.upstream import serve_demo

        await serve_demo(demo_sock)
    await runtime.gateway.serve(sock)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, runtime.reload, "SIGHUP")
    if parent_alive is not None:
        loop.add_reader(parent_alive, _parent_gone, loop, parent_alive, stop)
    watcher = loop.create_task(_watch(runtime, source))
    await stop.wait()
    watcher.cancel()
    await runtime.drain()
    return 0


def _parent_gone(loop: asyncio.AbstractEventLoop, parent_alive: int, stop: asyncio.Event) -> None:
    # Readable means end of file: the supervisor never writes, so its write end closed with it.
    loop.remove_reader(parent_alive)
    log.error("the supervising process is gone; draining and exiting")
    stop.set()


async def _watch(runtime: Runtime, source: ConfigSource) -> None:
    """Reload when the file changes (mtime polled once a second: portable and cheap)."""
    seen = source.mtime()
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        current = source.mtime()
        if current != seen:
            seen = current
            runtime.reload("file changed")


def _supervise(
    source: ConfigSource,
    config: GatewayConfig,
    sock: socket.socket,
    demo_sock: socket.socket | None,
    count: int,
) -> int:
    children: dict[int, int] = {}  # pid -> worker slot
    stopping = False
    # Workers learn of this process's death, however it dies (SIGKILL included), from a pipe only
    # it holds the write end of: the kernel closes that end when it exits, and each worker's loop
    # sees end of file. Unlike PR_SET_PDEATHSIG this works on every POSIX system, tracks the
    # process rather than the forking thread, and has no window to close between fork and setup
    # (an end of file that came early is still there when the worker starts watching).
    parent_alive, held_by_parent = os.pipe()

    def start(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            os.close(held_by_parent)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = _worker(source, config, sock, demo_sock, parent_alive)
            finally:
                os._exit(code)
        children[pid] = slot

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for slot in range(count):
        start(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, None)
        if slot is not None and not stopping:
            log.error("worker %d exited (status %d); starting a new one", pid, status)
            time.sleep(0.2)
            start(slot)
    return 0
