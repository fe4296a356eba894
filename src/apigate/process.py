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
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import uvloop

from apigate.config.compile import compile_plan, needs_of, state_urls_of
from apigate.config.loader import ConfigError, load_config
from apigate.config.models import GatewayConfig
from apigate.engine.server import Gateway
from apigate.node.link import WorkerLink
from apigate.node.runtime import NodeRuntime
from apigate.observe.accesslog import AccessLog
from apigate.observe.base import Observer, SampledHook
from apigate.observe.events import EventFeed
from apigate.observe.tracing import SpanExport
from apigate.observe.usage import UsageObserver
from apigate.services import Services

log = logging.getLogger("apigate")

WATCH_INTERVAL = 1.0
DEPENDENCY_CHECK_INTERVAL = 2.0


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


@dataclass
class Sockets:
    """What the process bound before forking: workers and the node agent inherit them."""

    proxy: socket.socket
    demo: socket.socket | None = None
    admin: socket.socket | None = None
    node_path: str | None = None  # the node agent's Unix socket, when it runs in its own process


def bind_admin(config: GatewayConfig) -> socket.socket | None:
    """The admin listener's socket (None: ``admin: null``). Without a token it binds loopback only."""
    admin = config.admin
    if admin is None:
        return None
    host = admin.listen.host
    if admin.token is None and not _is_loopback(host):
        print(
            f"apigate: the admin listener has no token (admin.token or $APIGATE_ADMIN_TOKEN), so it "
            f"listens on 127.0.0.1 only, not on {host}",
            file=sys.stderr,
            flush=True,
        )
        host = "127.0.0.1"
    return bind(host, admin.listen.port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
    try:
        admin_sock = bind_admin(config)
    except OSError as exc:
        assert config.admin is not None
        listen = config.admin.listen
        print(
            f"apigate: cannot listen for the admin API on {listen.host}:{listen.port}: {exc} "
            "(set admin.listen, or admin: null to run without it)",
            file=sys.stderr,
        )
        return 1
    where = f"config {source.path}" if source.path else "the embedded demo (GET /api/v1/hello)"
    print(f"apigate listening on {_url_of(sock)} with {count} worker(s), {where}", flush=True)
    if admin_sock is not None:
        guard = "bearer token required" if config.admin and config.admin.token else "no token: loopback only"
        print(f"apigate admin API on {_url_of(admin_sock)} ({guard})", flush=True)
    per_process = _limits_counted_per_process(config)
    if count > 1 and per_process:
        print(
            f"apigate: rate limits on {', '.join(per_process)} count in each of the {count} workers "
            "separately (state: memory://); name a Redis in state.url to count them together",
            file=sys.stderr,
            flush=True,
        )
    sockets = Sockets(sock, demo_sock, admin_sock)
    if count == 1:
        return _worker(source, config, sockets)
    return _supervise(source, config, sockets, count)


def _url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
    source: ConfigSource, config: GatewayConfig, sockets: Sockets, parent_alive: int | None = None
) -> int:
    """Serve until told to stop; ``parent_alive`` is the read end of the supervisor's pipe."""
    uvloop.install()
    return asyncio.run(_serve(source, config, sockets, parent_alive))


class Runtime:
    """One worker's gateway, the shared services and the config they were built from."""

    def __init__(self, source: ConfigSource, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.gateway = Gateway(loop)
        self.services = Services()  # outlive reloads: a reload recompiles policies, not connections
        self.node: NodeRuntime | None = None  # the node agent, when it runs in this process
        self.discovered: dict[str, list[tuple[str, int]]] = {}  # targets the node found, by upstream
        # What watches finished exchanges; each outlives reloads (observe/base.py).
        self.access_log = AccessLog()
        self.events = EventFeed()
        self.observers: list[Observer] = [self.access_log, UsageObserver(), self.events, SpanExport()]
        self.observing = False
        self._reported: GatewayConfig | None = None  # the config whose inactive shorthands were logged

    def apply(self, config: GatewayConfig) -> None:
        """Compile ``config`` and serve it; raises (and keeps the running plan) if compiling fails."""
        applied = [hook for observer in self.observers if (hook := observer.apply(config)) is not None]
        hooks = [hook for hook in applied if not isinstance(hook, SampledHook)]
        sampled = [hook.hook for hook in applied if isinstance(hook, SampledHook)]
        gateway = self.gateway
        states, meters = gateway.target_states, gateway.meters
        plan = compile_plan(
            config, gateway.pools, self.services, states, self.discovered, hooks, meters, sampled
        )
        gateway.apply(plan)
        self.config = config
        if config is not self._reported:  # once per config loaded, not again when it is re-applied
            self._reported = config
            for name, inactive in plan.inactive.items():
                for shorthand, why in inactive:
                    log.warning("route %s: %s not active: %s", name, shorthand, why)

    def take_targets(self, upstreams: dict[str, list[tuple[str, int]]]) -> None:
        """Discovered targets changed: serve them from now on (requests running keep their plan)."""
        self.discovered.update(upstreams)
        try:
            self.apply(self.config)
        except Exception:
            log.exception("applying discovered targets failed; the running plan stays")

    def events_wanted(self, on: bool) -> None:
        """The node wants request events (someone listens) or no longer does: the hook comes or goes."""
        if on != self.events.wanted:
            self.events.wanted = on
            try:
                self.apply(self.config)
            except Exception:
                log.exception("turning request events %s failed", "on" if on else "off")

    def counts(self) -> dict[str, Any]:
        """What the observers and services count, for the node's merged metrics."""
        counters: dict[str, int] = {}
        for observer in self.observers:
            counters.update(observer.counts())
        counters.update(self.services.counters())
        counts: dict[str, Any] = {"counters": counters, "gauges": self.services.gauges()}
        bodies = self.services.transform_bodies()
        if bodies:
            counts["transform_bodies"] = bodies
        webhooks = self.services.webhook_metrics()
        if webhooks is not None:
            counts["webhooks"] = webhooks
        return counts

    async def start_services(self) -> None:
        """Start the shared services the current plan's policies need (before serving)."""
        plan = self.gateway.plan
        if await self.services.start(self.config, needs_of(plan), state_urls_of(plan)):
            # Compiled again with the state backend running: what /routes says of a policy (where
            # its counters live) may depend on it. Counters outlive this as they outlive a reload.
            self.apply(self.config)
        if not self.observing:
            self.observing = True
            for observer in self.observers:
                await observer.start(self.config, self.services)

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
        if self.node is not None:
            self.node.apply(config)
        self.gateway.spawn(self._start_services_after_reload())
        log.info("reloaded config (%s): %d routes", why, len(config.routes))

    async def _start_services_after_reload(self) -> None:
        try:
            await self.start_services()
        except Exception:
            log.exception("starting services after a reload failed; policies that need them answer 503")

    async def watch_dependencies(self) -> None:
        """Keep what /health/detailed says of the store and state backend fresh."""
        while True:
            try:
                self.gateway.dependencies = await self.services.reachability()
            except Exception:
                log.exception("checking the store and state backend failed")
            await asyncio.sleep(DEPENDENCY_CHECK_INTERVAL)

    async def drain(self) -> None:
        timeouts = self.gateway.plan.timeouts
        if timeouts.drain_notice:
            log.info("not ready; serving %.0fs more before draining", timeouts.drain_notice)
        log.info("draining (up to %.0fs)", timeouts.drain)
        await self.gateway.drain(timeouts.drain, timeouts.drain_notice)
        for observer in self.observers:
            try:
                await observer.stop()
            except Exception:
                log.exception("stopping %s failed", type(observer).__name__)
        await self.services.stop()


async def _serve(
    source: ConfigSource, config: GatewayConfig, sockets: Sockets, parent_alive: int | None = None
) -> int:
    loop = asyncio.get_running_loop()
    runtime = Runtime(source, loop)
    runtime.apply(config)
    await runtime.start_services()
    if sockets.demo is not None:
        from apigate.demo.upstream import serve_demo

        await serve_demo(sockets.demo)
    link = _link_to_node(runtime, config, sockets)
    link.start()
    await runtime.gateway.serve(sockets.proxy)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, runtime.reload, "SIGHUP")
    if parent_alive is not None:
        loop.add_reader(parent_alive, _parent_gone, loop, parent_alive, stop)
    watcher = loop.create_task(_watch(source, runtime.reload))
    dependencies = loop.create_task(runtime.watch_dependencies())
    await stop.wait()
    watcher.cancel()
    dependencies.cancel()
    await runtime.drain()
    await link.stop()
    if runtime.node is not None:
        await runtime.node.stop()
    return 0


def _link_to_node(runtime: Runtime, config: GatewayConfig, sockets: Sockets) -> WorkerLink:
    """The worker's link to the node agent: in this process when it is the only worker, else the
    agent process's Unix socket."""
    path = sockets.node_path
    if path is None:
        node = runtime.node = NodeRuntime(config, sockets.admin)
        node.start()
        connect = node.connect_here
    else:
        connect = partial(asyncio.open_unix_connection, path)
    link = WorkerLink(runtime.gateway, connect, runtime.take_targets, runtime.counts, runtime.events_wanted)
    runtime.events.send = link.send_events
    return link


def _node_agent(
    source: ConfigSource, config: GatewayConfig, sockets: Sockets, node_sock: socket.socket, parent_alive: int
) -> int:
    """The node agent's own process (several workers): active checks and the admin listener."""
    uvloop.install()
    return asyncio.run(_serve_node(source, config, sockets, node_sock, parent_alive))


async def _serve_node(
    source: ConfigSource, config: GatewayConfig, sockets: Sockets, node_sock: socket.socket, parent_alive: int
) -> int:
    loop = asyncio.get_running_loop()
    node = NodeRuntime(config, sockets.admin)
    node.start()
    await node.listen(node_sock)

    def reload(why: str) -> None:
        try:
            node.apply(source.load())
        except ConfigError as exc:
            log.error("node: reload (%s) refused, the running config stays:\n%s", why, exc)

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, "SIGHUP")
    loop.add_reader(parent_alive, _parent_gone, loop, parent_alive, stop)
    watcher = loop.create_task(_watch(source, reload))
    await stop.wait()
    watcher.cancel()
    await node.stop()
    return 0


def _parent_gone(loop: asyncio.AbstractEventLoop, parent_alive: int, stop: asyncio.Event) -> None:
    # Readable means end of file: the supervisor never writes, so its write end closed with it.
    loop.remove_reader(parent_alive)
    log.error("the supervising process is gone; draining and exiting")
    stop.set()


async def _watch(source: ConfigSource, reload: Callable[[str], None]) -> None:
    """Reload when the file changes (mtime polled once a second: portable and cheap)."""
    seen = source.mtime()
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        current = source.mtime()
        if current != seen:
            seen = current
            reload("file changed")


NODE_SLOT = -1  # the node agent's slot among the supervised children


def _close(*held: socket.socket | None) -> None:
    for sock in held:
        if sock is not None:
            sock.close()


def _name_process(name: str) -> None:
    """Name this process as ps and top show it (Linux: /proc/self/comm); elsewhere nothing."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])


def _supervise(source: ConfigSource, config: GatewayConfig, sockets: Sockets, count: int) -> int:
    """Fork the node agent and the workers, restart whichever exits, forward signals."""
    children: dict[int, int] = {}  # pid -> worker slot (NODE_SLOT: the node agent)
    stopping = False
    # Workers learn of this process's death, however it dies (SIGKILL included), from a pipe only
    # it holds the write end of: the kernel closes that end when it exits, and each worker's loop
    # sees end of file. Unlike PR_SET_PDEATHSIG this works on every POSIX system, tracks the
    # process rather than the forking thread, and has no window to close between fork and setup
    # (an end of file that came early is still there when the worker starts watching).
    parent_alive, held_by_parent = os.pipe()
    # The node agent's socket, in a directory only this user can enter; bound here so that it
    # outlives an agent that is restarted (workers reconnect to the same path).
    node_dir = tempfile.mkdtemp(prefix="apigate-node-")
    node_path = os.path.join(node_dir, "node.sock")
    node_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    node_sock.bind(node_path)
    node_sock.listen(256)
    worker_sockets = Sockets(sockets.proxy, sockets.demo, None, node_path)

    def start(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            os.close(held_by_parent)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                # Each child keeps only the sockets it serves: a listener held by a process that
                # never accepts on it would take connections nobody answers.
                if slot == NODE_SLOT:
                    _name_process("apigate-node")
                    _close(sockets.proxy, sockets.demo)
                    code = _node_agent(source, config, sockets, node_sock, parent_alive)
                else:
                    _name_process("apigate-worker")
                    _close(sockets.admin, node_sock)
                    code = _worker(source, config, worker_sockets, parent_alive)
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
    try:
        start(NODE_SLOT)
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
                what = "the node agent" if slot == NODE_SLOT else "worker"
                log.error("%s %d exited (status %d); starting a new one", what, pid, status)
                time.sleep(0.2)
                start(slot)
    finally:
        node_sock.close()
        shutil.rmtree(node_dir, ignore_errors=True)
    return 0
