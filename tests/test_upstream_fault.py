"""A fault test under load: three targets behind one upstream, constant traffic from many keep-alive
connections, one target SIGKILLed mid-run and restarted on the same port 5 s later.

With retries on `connect` and `reset` and passive health on, no client request may fail (at most
those in flight on the dying target, which GET retries should save too); the dead target stops
getting traffic once its consecutive failures reach the threshold, and gets it back after it
returns; and the gateway logs no error while it handles all this. Everything is judged from
timestamps the clients and the gateway's log recorded; the counts are printed (run with
``pytest -s`` to see them). Run with one worker and with two.
"""

from __future__ import annotations

import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.errors_helpers import Client, PeerClosed, get, wait_until
from tests.support.gateway import GatewayProcess

REPO = Path(__file__).resolve().parents[1]
CONNECTIONS = 16
KILL_AFTER = 3.0  # seconds of steady traffic before the kill
DOWN_FOR = 5.0  # the killed target is restarted this long after it died
RUN_SECONDS = 12.0  # the least the load runs, from its start
BACK_WITHIN = 8.0  # after the restart, the target must be served again within this
KEEP_AFTER_BACK = 1.0  # load kept on once it is back, to see it in rotation
RESPONSE_MARGIN = 0.5  # a response the dead target wrote before dying may still be on its way
CONSECUTIVE_FAILURES = 3
NAMES = ("A", "B", "C")
VICTIM = "B"
# Below the usual ephemeral range (32768-60999), so no outgoing connection takes the dead target's
# port while it is down, and above the range tests/support/redis_cluster.py picks from.
PORT_RANGE = (22000, 32000)
LOG_TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def unused_port(taken: set[int]) -> int:
    while True:
        port = random.randrange(*PORT_RANGE)
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


class TargetProcess:
    """``python -m tests.support.faulty_upstream PORT NAME``: a target that can be SIGKILLed and
    started again on the same port."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> TargetProcess:
        args = [sys.executable, "-m", "tests.support.faulty_upstream", str(self.port), self.name]
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.proc = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        output = b""
        while b"ready" not in output:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                self.kill()
                raise TimeoutError(f"target {self.name} not ready on port {self.port}: {output!r}")
            line = proc.stdout.readline()
            if not line:  # it exited: the port was taken, most likely
                proc.wait()
                raise RuntimeError(f"target {self.name} exited with {proc.returncode}: {output!r}")
            output += line
        return self

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone (its sockets are closed by then)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@dataclass(frozen=True, slots=True)
class Record:
    """One client request: when it was sent and answered (monotonic seconds), the status (0: the
    connection broke or could not be opened) and the target named in a 200 body."""

    sent: float
    done: float
    status: int
    target: str | None
    error: str | None = None


class Load:
    """``connections`` threads, each sending GET after GET on its own keep-alive connection and
    reconnecting when the gateway closes it, until ``stop()``."""

    def __init__(self, port: int, connections: int) -> None:
        self.port = port
        self.stopping = threading.Event()
        self.records: list[list[Record]] = [[] for _ in range(connections)]
        self.threads = [
            threading.Thread(target=self._drive, args=(records,), daemon=True) for records in self.records
        ]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> list[Record]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)
        assert not any(thread.is_alive() for thread in self.threads), "a client is stuck in a request"
        return sorted((r for records in self.records for r in records), key=lambda r: r.sent)

    def served(self, name: str, since: float) -> int:
        """Responses from ``name`` to requests sent after ``since``, read while the load runs (from
        the newest back, so polling does not rescan the whole run)."""
        count = 0
        for records in self.records:
            for index in range(len(records) - 1, -1, -1):
                record = records[index]
                if record.sent <= since:
                    break
                count += record.target == name
        return count

    def _drive(self, records: list[Record]) -> None:
        client: Client | None = None
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                if client is None:
                    client = Client(self.port, timeout=10.0)
                response = client.request("GET", "/api/work")
            except (PeerClosed, OSError) as exc:
                records.append(Record(sent, time.monotonic(), 0, None, repr(exc)))
                if client is not None:
                    client.close()
                    client = None
                continue
            done = time.monotonic()
            target = response.json().get("target") if response.status == 200 else None
            records.append(Record(sent, done, response.status, target, None if target else repr(response)))
            if (response.header("connection") or "").lower() == "close":
                client.close()
                client = None
        if client is not None:
            client.close()


def log_time(stamp: str) -> float:
    """A log line's asctime (local time, as logging writes it) as seconds since the epoch."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class GatewayLog:
    """What the gateway logged about the victim: its ejections and its failed attempts, with the
    time of the line (wall clock), and the retries every multi-attempt exchange took."""

    ejections: list[tuple[float, str]]
    failed_attempts: list[tuple[float, str]]
    retries: int

    @classmethod
    def read(cls, text: str, victim: TargetProcess) -> GatewayLog:
        address = f"127.0.0.1:{victim.port}"
        ejection = re.compile(
            rf"^{LOG_TIME} WARNING apigate: target fleet/http://{re.escape(address)} ejected (.*)$", re.M
        )
        attempts = re.compile(
            rf"^{LOG_TIME} WARNING apigate: request \S+ GET \S+: (\d+) attempt\(s\): (.*); ", re.M
        )
        failed: list[tuple[float, str]] = []
        retries = 0
        for match in attempts.finditer(text):
            retries += int(match[2]) - 1
            failed += [
                (log_time(match[1]), item.split(" ", 1)[1])
                for item in match[3].split(", ")
                if item.startswith(address + " ") and not item.endswith(" 200")
            ]
        return cls([(log_time(m[1]), m[2]) for m in ejection.finditer(text)], failed, retries)


@pytest.fixture
def targets() -> Iterator[dict[str, TargetProcess]]:
    taken: set[int] = set()
    started: dict[str, TargetProcess] = {}
    try:
        for name in NAMES:
            port = unused_port(taken)
            taken.add(port)
            started[name] = TargetProcess(name, port).start()
        yield started
    finally:
        for target in started.values():
            target.kill()


def fleet_config(targets: dict[str, TargetProcess]) -> dict[str, object]:
    return {
        "upstreams": {
            "fleet": {
                "targets": [t.url for t in targets.values()],
                "health": {
                    "passive": {
                        "consecutive_failures": CONSECUTIVE_FAILURES,
                        "base_ejection": "1s",
                        "max_ejection_percent": 34,
                    }
                },
            }
        },
        "routes": [
            {
                "path": "/api/*",
                "upstream": "fleet",
                "retries": {
                    "attempts": 2,
                    "retry_on": ["connect", "reset"],
                    "backoff": {"base": "10ms", "max": "50ms"},
                },
                # Far above any healthy exchange here, and short enough that one the gateway lost
                # track of is answered (504) within the run rather than at the default 30 s.
                "timeout": "4s",
            }
        ],
    }


def by_target(records: list[Record]) -> dict[str, int]:
    counts = Counter(r.target for r in records if r.target is not None)
    return {name: counts[name] for name in NAMES}


@dataclass(frozen=True, slots=True)
class Timeline:
    """When the run's events happened (monotonic seconds; ``killed_wall`` is the kill by the wall
    clock, to compare with the gateway's log)."""

    started: float
    killed: float
    killed_wall: float
    dead: float
    restarted: float
    back_seen: float


def run_fault(gateway: GatewayProcess, victim: TargetProcess) -> tuple[list[Record], Timeline]:
    """Load the gateway, kill ``victim`` once traffic is steady, restart it ``DOWN_FOR`` later, and
    keep the load on until it is served again (and at least ``RUN_SECONDS`` in all)."""
    load = Load(gateway.port, CONNECTIONS).start()
    try:
        started = time.monotonic()
        wait_until(
            lambda: all(load.served(name, started) >= 20 for name in NAMES),
            timeout=10,
            message="traffic on all three targets",
        )
        time.sleep(max(0.0, started + KILL_AFTER - time.monotonic()))  # the kill is on a schedule
        killed, killed_wall = time.monotonic(), time.time()
        victim.kill()
        dead = time.monotonic()
        time.sleep(max(0.0, dead + DOWN_FOR - time.monotonic()))  # and so is the restart
        victim.start()
        restarted = time.monotonic()
        wait_until(
            lambda: load.served(victim.name, restarted) > 0,
            timeout=BACK_WITHIN,
            message=f"target {victim.name} served again after its restart",
        )
        back_seen = time.monotonic()
        time.sleep(max(0.0, max(started + RUN_SECONDS, back_seen + KEEP_AFTER_BACK) - time.monotonic()))
    finally:
        records = load.stop()
    return records, Timeline(started, killed, killed_wall, dead, restarted, back_seen)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_target_costs_no_request_and_comes_back(
    tmp_path: Path, targets: dict[str, TargetProcess], workers: int
) -> None:
    gateway = GatewayProcess(tmp_path, fleet_config(targets), workers=workers).start()
    victim = targets[VICTIM]
    try:
        wait_until(
            lambda: get(gateway.port, "/api/warm").status == 200, timeout=10, message="the gateway serves"
        )
        records, at = run_fault(gateway, victim)
        # /stats counts one worker's retries, the free ones on connections closed while idle too.
        stats = get(gateway.port, "/stats").json() if workers == 1 else None
    finally:
        gateway.stop()
    output = gateway.output()
    log = GatewayLog.read(output, victim)

    before = [r for r in records if r.done < at.killed]
    during = [r for r in records if at.killed <= r.done < at.restarted]
    after = [r for r in records if r.done >= at.restarted]
    failed = [r for r in records if r.status != 200]
    in_flight_at_kill = [r for r in records if r.sent <= at.killed < r.done]
    back = [r for r in after if r.target == VICTIM]
    first_back = min(r.done for r in back) - at.restarted if back else float("inf")
    ejected_within = log.ejections[0][0] - at.killed_wall if log.ejections else float("inf")
    down_attempts = [(t, what) for t, what in log.failed_attempts if t >= at.killed_wall - 0.01]
    counts = {"before": by_target(before), "during": by_target(during), "after": by_target(after)}
    print(
        f"\nfault under load, {workers} worker(s), {CONNECTIONS} connections, "
        f"{records[-1].done - records[0].sent:.1f} s: {len(records)} requests; "
        + "; ".join(
            f"{phase} {' '.join(f'{n}={c}' for n, c in per.items())}" for phase, per in counts.items()
        )
        + f"; failed {len(failed)} (in flight at the kill: {len(in_flight_at_kill)}); "
        f"{VICTIM} ejected {len(log.ejections)} time(s), first {ejected_within:.3f} s after the kill; "
        f"failed attempts on {VICTIM} after the kill {len(down_attempts)} "
        f"({', '.join(f'{k} {v}' for k, v in Counter(w for _, w in down_attempts).items()) or 'none'}); "
        f"{VICTIM} served again {first_back:.3f} s after its restart; "
        f"retries {log.retries} (gateway log)" + (f", {stats['retries']} (/stats)" if stats else "")
    )
    for r in failed:
        sent, done = r.sent - at.killed, r.done - at.killed
        print(f"failed: sent {sent:+.3f} s, done {done:+.3f} s from the kill: {r.error}")

    # The fault is handled, not crashed through: no error or traceback in the gateway's log.
    errors = [line for line in output.splitlines() if " ERROR " in line or line.startswith("Traceback")]
    assert errors == [], (failed[:5], output[output.index(errors[0]) :][:4000])
    # Every request was answered; only one in flight when the target died may have failed.
    assert failed == [] or (
        len(failed) <= CONNECTIONS and all(r.sent <= at.dead and r.done >= at.killed for r in failed)
    ), failed[:20]
    # Nothing came from the dead target: no request sent after it died, and no answer later than
    # what it had written before dying could take to arrive.
    from_the_dead = [
        r for r in during if r.target == VICTIM and (r.sent > at.dead or r.done > at.dead + RESPONSE_MARGIN)
    ]
    assert from_the_dead == [], from_the_dead[:10]
    # The gateway saw it fail and ejected it within the threshold: soon after the kill, and after
    # no more failed attempts than the threshold plus what was in flight, in each worker.
    assert log.ejections, output[-3000:]
    assert ejected_within < 1.0, log.ejections
    first_ejections = [t for t, what in log.ejections if what.endswith("ejection 1)")]
    first_round = [a for a in down_attempts if a[0] <= max(first_ejections)]
    assert len(first_round) <= workers * (CONSECUTIVE_FAILURES + CONNECTIONS), first_round
    # While it was down it was only tried when an ejection ran out, a few times each, and never
    # got the third of the traffic round robin would give it.
    assert len(down_attempts) <= len(log.ejections) * (CONSECUTIVE_FAILURES + CONNECTIONS), down_attempts
    assert len(down_attempts) < len(during) / 10, (len(down_attempts), len(during))
    # A and C absorbed its share meanwhile, evenly, and the rate held up.
    survivors = [counts["during"][name] for name in NAMES if name != VICTIM]
    assert min(survivors) > 0.4 * sum(survivors), counts
    rate_before = len(before) / (at.killed - records[0].sent)
    rate_during = len(during) / (at.restarted - at.killed)
    assert rate_during > 0.5 * rate_before, (rate_before, rate_during)
    # After the restart it is back in rotation, and holds its share once back.
    assert first_back < BACK_WITHIN, first_back
    held = [r for r in records if r.sent >= at.back_seen]
    assert by_target(held)[VICTIM] >= 0.2 * len(held), by_target(held)
