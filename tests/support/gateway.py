"""Start a real `apigate run` process on a free port for a test, and stop it afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import yaml


def stop_process(proc: subprocess.Popen, log: IO[bytes]) -> int:
    """SIGTERM (the gateway drains), then SIGKILL if it does not exit; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    log.close()
    return proc.returncode


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


class GatewayProcess:
    """`python -m apigate run -c <file>`; ``config`` is a dict written as YAML (listen is filled in)."""

    def __init__(self, tmp: Path, config: dict, workers: int | None = None, env: dict | None = None) -> None:
        self.port = free_port()
        config = {"listen": f"127.0.0.1:{self.port}", **config}
        self.config_path = tmp / "apigate.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = tmp / "gateway.log"
        self.workers = workers
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayProcess:
        args = [sys.executable, "-m", "apigate", "run", "-c", str(self.config_path)]
        if self.workers:
            args += ["--workers", str(self.workers)]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # In a session of its own, as a service manager starts it: a signal to its process group
        # (signal_group) reaches it and its helpers, not the tests.
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        try:
            wait_for_port(self.port, self.proc)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"gateway did not start: {exc}\n{self.output()}") from exc
        return self

    def write_config(self, config: dict) -> None:
        config = {"listen": f"127.0.0.1:{self.port}", **config}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def helpers(self, name: str) -> list[int]:
        """The pids of the processes under this gateway named ``name`` in ps (/proc/<pid>/comm):
        apigate-log (an access log's writing process), apigate-spans (span export)."""
        assert self.proc is not None
        parents: dict[int, int] = {}
        named: list[int] = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue  # (it ended meanwhile)
                pid = int(entry.name)
                parents[pid] = int(stat.rpartition(")")[2].split()[1])
                if stat[stat.index("(") + 1 : stat.rindex(")")] == name:
                    named.append(pid)

        def under_gateway(pid: int) -> bool:
            while pid > 1:
                pid = parents.get(pid, 0)
                if self.proc is not None and pid == self.proc.pid:
                    return True
            return False

        return [pid for pid in named if under_gateway(pid)]

    def signal_group(self, sig: int) -> None:
        """``sig`` to every process of the gateway at once, as systemd stops a service
        (KillMode=control-group) and a terminal sends Ctrl-C."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc, self.log)
