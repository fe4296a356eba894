"""Process lifecycle: reload (SIGHUP, file change, refused), drain on SIGTERM, workers, the demo."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.errors_helpers import (
    Client,
    Launched,
    PeerClosed,
    apigate_cmd,
    assert_error,
    children_of,
    clean_env,
    free_port,
    get,
    pid_alive,
    port_refuses,
    wait_until,
)
from tests.support.gateway import GatewayProcess
from tests.support.upstream import UpstreamServer


def route(path: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"path": path, "target": target, **extra}


def upstream_got(upstream: UpstreamServer, path: str) -> Callable[[], bool]:
    return lambda: any(seen.path == path for seen in upstream.requests)


def serving(gateway: GatewayProcess, path: str) -> Callable[[], bool]:
    return lambda: get(gateway.port, path).status == 200


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """Start ``python -m apigate <args>`` by hand in a directory of the test's choosing."""
    started: list[Launched] = []

    def start(args: list[str], cwd: Path, env: dict[str, str]) -> Launched:
        process = Launched(apigate_cmd(*args), cwd, env, tmp_path / f"launched{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


# --- reload ------------------------------------------------------------------------------------------


def test_sighup_reload_keeps_inflight_and_keepalive(start_gateway: Any, upstream: UpstreamServer) -> None:
    routes = [route("/a", upstream.url), route("/delay/*", upstream.url)]
    gateway = start_gateway({"routes": routes})
    with Client(gateway.port) as keep, Client(gateway.port) as slow:
        assert keep.request("GET", "/a").status == 200
        assert_error(get(gateway.port, "/b"), 404)
        slow.send_request("GET", "/delay/1500")
        wait_until(upstream_got(upstream, "/delay/1500"), message="the slow request upstream")

        gateway.write_config({"routes": [*routes, route("/b", upstream.url)]})
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded config (SIGHUP)" in gateway.output(), message="the reload log line")

        assert get(gateway.port, "/b").status == 200
        finished = slow.read_response()
        assert finished.status == 200
        assert finished.json() == {"delayed": True}
        # The connection opened before the reload goes on, with the new routes.
        assert keep.request("GET", "/a").status == 200
        assert keep.request("GET", "/b").status == 200
    assert gateway.proc.poll() is None


def test_file_change_reloads_without_signal(start_gateway: Any, upstream: UpstreamServer) -> None:
    gateway = start_gateway({"routes": [route("/a", upstream.url)]})
    assert get(gateway.port, "/a").status == 200  # the gateway (and its file watcher) is running
    before = gateway.config_path.stat().st_mtime_ns
    gateway.write_config({"routes": [route("/a", upstream.url), route("/c", upstream.url)]})
    if gateway.config_path.stat().st_mtime_ns == before:  # a coarse clock: make the change visible
        os.utime(gateway.config_path, ns=(before + 10**9, before + 10**9))
    wait_until(
        serving(gateway, "/c"), timeout=10, interval=0.1, message="the new route after the file change"
    )
    assert "reloaded config (file changed)" in gateway.output()


def test_invalid_config_on_reload_is_refused(start_gateway: Any, upstream: UpstreamServer) -> None:
    gateway = start_gateway({"routes": [route("/a", upstream.url)]})
    assert get(gateway.port, "/a").status == 200
    gateway.config_path.write_text(
        f"listen: 127.0.0.1:{gateway.port}\n"
        "routes:\n"
        "  - path: no-slash\n"
        f"    target: {upstream.url}\n"
        "    tiemout: 5s\n"
    )
    gateway.signal(signal.SIGHUP)
    wait_until(lambda: "reload (SIGHUP) refused" in gateway.output(), message="the refusal in the log")
    log = gateway.output()
    assert "line 3: routes[0].path: must start with /" in log, log
    assert "line 5: routes[0].tiemout" in log, log
    assert get(gateway.port, "/a").status == 200
    assert gateway.proc.poll() is None

    # A fixed file is taken again.
    gateway.write_config({"routes": [route("/a", upstream.url), route("/fixed", upstream.url)]})
    gateway.signal(signal.SIGHUP)
    wait_until(serving(gateway, "/fixed"), message="the fixed config")


# --- drain -----------------------------------------------------------------------------------------


def test_sigterm_drains_inflight_then_exits_0(start_gateway: Any, upstream: UpstreamServer) -> None:
    gateway = start_gateway({"routes": [route("/delay/*", upstream.url)]})
    with Client(gateway.port) as slow:
        slow.send_request("GET", "/delay/2000")
        wait_until(upstream_got(upstream, "/delay/2000"), message="the slow request upstream")
        gateway.signal(signal.SIGTERM)
        wait_until(lambda: port_refuses(gateway.port), timeout=5, message="new connections refused")
        assert gateway.proc.poll() is None, "exited before the in-flight request was done"
        finished = slow.read_response()
        assert finished.status == 200
        assert finished.json() == {"delayed": True}
        assert finished.header("connection") == "close"
        assert slow.closed_by_peer()
    assert gateway.proc.wait(10) == 0


def test_drain_timeout_cuts_long_request(start_gateway: Any, upstream: UpstreamServer) -> None:
    gateway = start_gateway({"timeouts": {"drain": "300ms"}, "routes": [route("/delay/*", upstream.url)]})
    with Client(gateway.port, timeout=20) as slow:
        slow.send_request("GET", "/delay/10000")
        wait_until(upstream_got(upstream, "/delay/10000"), message="the slow request upstream")
        gateway.signal(signal.SIGTERM)
        # Well before the upstream would answer.
        assert gateway.proc.wait(6) == 0
        with pytest.raises(PeerClosed):
            slow.read_response()


# --- workers ---------------------------------------------------------------------------------------


def two_workers(gateway: GatewayProcess) -> set[int] | None:
    """The pids of the gateway's workers once both run (its other child is the node agent)."""
    assert gateway.proc is not None
    found = {pid for pid in children_of(gateway.proc.pid) if process_name(pid) == "apigate-worker"}
    return found if len(found) == 2 else None


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_the_node_agent_is_restarted_and_workers_relink(start_gateway: Any, upstream: UpstreamServer) -> None:
    gateway = start_gateway({"routes": [route("/echo", upstream.url)]}, workers=2)
    assert gateway.proc is not None

    def node_agent() -> int | None:
        found = [pid for pid in children_of(gateway.proc.pid) if process_name(pid) == "apigate-node"]
        return found[0] if found else None

    first = wait_until(node_agent, message="the node agent")
    os.kill(first, signal.SIGKILL)
    second = wait_until(lambda: (pid := node_agent()) and pid != first and pid, message="a new node agent")
    assert f"the node agent {first} exited" in gateway.output()
    assert get(gateway.port, "/echo").status == 200  # the workers served on
    gateway.signal(signal.SIGTERM)
    assert gateway.proc.wait(10) == 0
    assert not pid_alive(second)


def test_two_workers_serve_restart_and_stop(start_gateway: Any, upstream: UpstreamServer) -> None:
    gateway = start_gateway({"routes": [route("/echo", upstream.url)]}, workers=2)
    first = wait_until(lambda: two_workers(gateway), message="two worker processes")

    # Each worker's request ids start with its own random prefix: new connections until both answered.
    prefixes: set[str] = set()

    def both_answered() -> bool:
        response = get(gateway.port, "/echo")
        assert response.status == 200, response
        prefixes.add(response.json()["headers"]["x-request-id"][:16])
        return len(prefixes) == 2

    wait_until(both_answered, timeout=20, interval=0, message="answers from both workers")
    for _ in range(50):
        assert get(gateway.port, "/echo").status == 200

    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    now = wait_until(
        lambda: (found := two_workers(gateway)) and victim not in found and found, message="a new worker"
    )
    assert len(now & first) == 1
    for _ in range(50):
        assert get(gateway.port, "/echo").status == 200
    assert f"worker {victim} exited" in gateway.output()

    gateway.signal(signal.SIGTERM)
    assert gateway.proc.wait(10) == 0
    assert not any(pid_alive(worker) for worker in now)


def test_workers_of_a_killed_master_drain_and_free_the_port(
    start_gateway: Any, upstream: UpstreamServer, tmp_path: Path, launch: Callable[..., Launched]
) -> None:
    gateway = start_gateway({"routes": [route("/echo", upstream.url)]}, workers=2)
    wait_until(lambda: two_workers(gateway), message="two worker processes")
    assert gateway.proc is not None
    workers = children_of(gateway.proc.pid)  # and the node agent
    try:
        assert get(gateway.port, "/echo").status == 200
        gateway.signal(signal.SIGKILL)  # the master alone: it cannot forward anything to the workers
        wait_until(
            lambda: not any(pid_alive(worker) for worker in workers),
            timeout=10,
            message="the workers and the node agent to exit after their master died",
        )
    finally:
        for worker in workers:  # orphans must not outlive a failed run and keep the port
            if pid_alive(worker):
                os.kill(worker, signal.SIGKILL)
    assert "the supervising process is gone; draining and exiting" in gateway.output()

    again = launch(["run", "-c", str(gateway.config_path)], tmp_path, clean_env())
    again.wait_listening(gateway.port)  # fails with the output if the port is still taken
    assert get(gateway.port, "/echo").status == 200


# --- the embedded demo and where the config comes from ----------------------------------------------


def test_embedded_demo_without_config(tmp_path: Path, launch: Callable[..., Launched]) -> None:
    cwd = tmp_path / "empty"
    cwd.mkdir()
    port = free_port()
    process = launch(["run"], cwd, clean_env(PORT=str(port)))
    process.wait_listening(port)
    response = get(port, "/api/v1/hello")
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    assert response.header("x-gateway") == "apigate"
    payload = response.json()
    assert payload["message"] == "hello from the apigate demo upstream"
    assert payload["path"] == "/api/v1/hello"
    assert payload["request_id"] == response.header("x-request-id")
    assert get(port, "/users/7").json()["path"] == "/api/v1/users/7"
    assert "embedded demo" in process.output()


def write_config(path: Path, port: int, routes: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{port}", "routes": routes}))
    return path


def test_apigate_yaml_in_cwd_is_used(
    tmp_path: Path, launch: Callable[..., Launched], upstream: UpstreamServer
) -> None:
    port = free_port()
    write_config(tmp_path / "apigate.yaml", port, [route("/from-cwd", upstream.url)])
    write_config(tmp_path / "routes.yaml", port, [route("/from-routes-yaml", upstream.url)])
    process = launch(["run"], tmp_path, clean_env())
    process.wait_listening(port)
    assert get(port, "/from-cwd").json()["path"] == "/from-cwd"
    assert_error(get(port, "/api/v1/hello"), 404)
    assert_error(get(port, "/from-routes-yaml"), 404)
    assert "config apigate.yaml" in process.output()


def test_routes_yaml_in_cwd_is_used_without_apigate_yaml(
    tmp_path: Path, launch: Callable[..., Launched], upstream: UpstreamServer
) -> None:
    # Where the Pactown gateway reads its routes when ROUTES_CONFIG is unset.
    port = free_port()
    write_config(tmp_path / "routes.yaml", port, [route("/from-routes-yaml", upstream.url)])
    process = launch(["run"], tmp_path, clean_env())
    process.wait_listening(port)
    assert get(port, "/from-routes-yaml").json()["path"] == "/from-routes-yaml"
    assert_error(get(port, "/api/v1/hello"), 404)
    assert "config routes.yaml" in process.output()


def test_routes_config_env_wins_over_cwd_file(
    tmp_path: Path, launch: Callable[..., Launched], upstream: UpstreamServer
) -> None:
    port = free_port()
    write_config(tmp_path / "apigate.yaml", port, [route("/from-cwd", upstream.url)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chosen = write_config(elsewhere / "routes.yaml", port, [route("/from-env", upstream.url)])
    process = launch(["run"], tmp_path, clean_env(ROUTES_CONFIG=str(chosen)))
    process.wait_listening(port)
    assert get(port, "/from-env").json()["path"] == "/from-env"
    assert_error(get(port, "/from-cwd"), 404)
    assert str(chosen) in process.output()
