"""The state backend, one suite over all: memory (with an injected clock), a real redis-server and a
real 3-node Redis Cluster.

Expiry on memory is driven by the clock; on Redis it is real time, so those cases use short TTLs
and poll with a deadline. Tests are sync functions driving one event loop per test (``run``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from apigate.config.models import GatewayConfig, StateConfig
from apigate.state import Script, StateBackend, StateUnavailable, open_state
from apigate.state.base import LocalData, Message
from apigate.state.memory import MemoryState
from apigate.state.redis import LIVENESS_PING_AFTER, OPERATION_TIMEOUT, RedisState
from tests.support.redis import RedisServer
from tests.support.state import Run, until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    state: StateBackend
    clock: FakeClock | None  # memory only: Redis keeps real time

    async def wait_past(self, ttl: float) -> None:
        """Let ``ttl`` seconds pass for the backend."""
        if self.clock is not None:
            self.clock.now += ttl
        else:
            await asyncio.sleep(ttl)


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest, run: Run) -> Iterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        yield Backend(MemoryState(clock=clock), clock)
        return
    state = RedisState(
        request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
    )
    run(state.open())
    yield Backend(state, None)
    run(state.close())


# -- operations -------------------------------------------------------------------------------------
def test_add_if_absent_admits_a_key_once_until_it_expires(backend: Backend, run: Run) -> None:
    state = backend.state

    async def scenario() -> None:
        assert await state.add_if_absent("nonce:a", 0.2) is True
        assert await state.add_if_absent("nonce:a", 0.2) is False
        assert await state.add_if_absent("nonce:b", 0.2) is True
        await backend.wait_past(0.3)
        assert await state.add_if_absent("nonce:a", 0.2) is True

    run(scenario())


def test_add_if_absent_nowait_answers_only_where_it_need_not_wait(backend: Backend, run: Run) -> None:
    state = backend.state
    if isinstance(state, MemoryState):
        assert state.add_if_absent_nowait("k", 10) is True
        assert state.add_if_absent_nowait("k", 10) is False
        assert run(state.add_if_absent("k", 10)) is False  # one window, whichever call is used
    else:
        assert state.add_if_absent_nowait("k", 10) is None


def test_incr_counts_and_sets_the_ttl_once(backend: Backend, run: Run) -> None:
    state = backend.state

    async def scenario() -> None:
        assert await state.incr("hits", ttl=0.4) == 1
        assert await state.incr("hits", 2, ttl=0.4) == 3
        await backend.wait_past(0.2)
        assert await state.incr("hits", ttl=0.4) == 4  # a later incr does not extend the window
        await backend.wait_past(0.3)
        assert await state.incr("hits", ttl=0.4) == 1
        assert await state.incr("forever") == 1
        assert await state.incr("forever", -3) == -2

    run(scenario())


def _allow_locally(data: LocalData, keys: list[str], args: list[Any]) -> list[int]:
    count = int(data.get(keys[0]) or 0)
    if count >= int(args[0]):
        return [0, count]
    data.set(keys[0], count + 1)
    if data.ttl(keys[0]) is None:
        data.expire(keys[0], int(args[1]) / 1000)
    return [1, count + 1]


ALLOW = Script(
    lua="""
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count >= tonumber(ARGV[1]) then return {0, count} end
redis.call('SET', KEYS[1], count + 1, 'KEEPTTL')
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, count + 1}
""",
    python=_allow_locally,
)


def test_a_script_decides_alike_on_both_backends(backend: Backend, run: Run) -> None:
    state = backend.state

    async def scenario() -> list[list[int]]:
        answers = [await state.run(ALLOW, ["window:alice"], [3, 300]) for _ in range(4)]
        answers.append(await state.run(ALLOW, ["window:bob"], [3, 300]))
        await backend.wait_past(0.4)
        answers.append(await state.run(ALLOW, ["window:alice"], [3, 300]))
        return answers

    assert run(scenario()) == [[1, 1], [1, 2], [1, 3], [0, 3], [1, 1], [1, 1]]


def test_keys_and_channels_are_namespaced_on_redis(redis_url: str, run: Run) -> None:
    state = RedisState(redis_url)

    async def scenario() -> None:
        await state.open()
        try:
            await state.add_if_absent("nonce:x", 30)
            await state.incr("hits")
        finally:
            await state.close()

    run(scenario())
    with redis.Redis.from_url(redis_url) as raw:
        assert sorted(raw.keys("*")) == [b"apigate:hits", b"apigate:nonce:x"]
        assert 0 < raw.pttl("apigate:nonce:x") <= 30_000


# -- pub/sub ------------------------------------------------------------------------------------------
def test_a_subscriber_hears_a_resync_then_every_message(backend: Backend, run: Run) -> None:
    async def scenario() -> None:
        # On Redis the publisher is another client, as another gateway process would be.
        publisher = backend.state
        if isinstance(backend.state, RedisState):
            publisher = RedisState(backend.state.url)
            await publisher.open()
        heard: list[Message] = []
        subscription = await backend.state.subscribe("changes", heard.append)
        await until(lambda: heard == [None])
        assert subscription.active is backend.state.shared
        await publisher.publish("changes", b"consumer")
        await publisher.publish("other", b"not for us")
        await publisher.publish("changes", b"api_key")
        await until(lambda: len(heard) == 3)
        assert heard == [None, b"consumer", b"api_key"]
        await subscription.close()
        await publisher.publish("changes", b"after close")
        await asyncio.sleep(0.1)
        assert len(heard) == 3
        if publisher is not backend.state:
            await publisher.close()

    run(scenario())


def test_redis_outage_raises_unavailable_and_the_subscription_resumes(tmp_path: Path, run: Run) -> None:
    server = RedisServer(tmp_path / "redis")  # not started yet: Redis is down at open
    state = RedisState(server.url)

    async def scenario() -> None:
        await state.open()  # does not fail: the gateway starts without Redis
        with pytest.raises(StateUnavailable):
            await state.add_if_absent("nonce", 10)
        heard: list[Message] = []
        subscription = await state.subscribe("changes", heard.append)
        await asyncio.sleep(0.3)
        assert not subscription.active and heard == []

        await asyncio.to_thread(server.start)
        await until(lambda: subscription.active and heard == [None])
        assert await state.add_if_absent("nonce", 10) is True

        await asyncio.to_thread(server.stop)
        await until(lambda: not subscription.active and heard == [None, None])  # told it is lost
        with pytest.raises(StateUnavailable):
            await state.publish("changes", b"lost")

        await asyncio.to_thread(server.start)
        await until(lambda: subscription.active and heard == [None, None, None])  # told to resync
        await state.publish("changes", b"back")
        await until(lambda: heard[-1] == b"back")
        await state.close()

    try:
        run(scenario())
    finally:
        server.stop()


def test_a_hung_redis_ends_the_subscription_in_bounded_time(tmp_path: Path, run: Run) -> None:
    """A stopped Redis keeps the connection open and silent: only an unanswered PING reveals it."""
    server = RedisServer(tmp_path / "redis").start()
    state = RedisState(server.url)
    assert server.proc is not None
    pid = server.proc.pid

    async def scenario() -> None:
        await state.open()
        heard: list[Message] = []
        subscription = await state.subscribe("changes", heard.append)
        await until(lambda: subscription.active and heard == [None])
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        await until(lambda: not subscription.active and heard == [None, None])  # told it is lost
        noticed_after = time.monotonic() - stopped_at
        assert noticed_after < LIVENESS_PING_AFTER + OPERATION_TIMEOUT + 0.5, noticed_after
        os.kill(pid, signal.SIGCONT)
        await until(lambda: subscription.active and heard == [None, None, None])
        await state.close()

    try:
        run(scenario())
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()


def test_an_error_reply_is_unavailable_too(tmp_path: Path, run: Run) -> None:
    """A full Redis (or a read-only replica after a failover) answers with an error, not a lost link."""
    server = RedisServer(tmp_path / "redis").start()
    state = RedisState(server.url)

    async def scenario() -> None:
        await state.open()
        assert await state.add_if_absent("before", 10) is True
        await state.client.config_set("maxmemory", "1")  # noeviction: every write is now refused
        try:
            with pytest.raises(StateUnavailable, match="maxmemory"):
                await state.add_if_absent("after", 10)
        finally:
            await state.client.config_set("maxmemory", "0")
        assert await state.add_if_absent("after", 10) is True
        await state.close()

    try:
        run(scenario())
    finally:
        server.stop()


# -- memory specifics ---------------------------------------------------------------------------------
def test_memory_drops_expired_keys_and_stays_within_max_keys() -> None:
    clock = FakeClock()
    state = MemoryState(clock=clock, max_keys=1000)
    for index in range(500):
        assert state.add_if_absent_nowait(f"old:{index}", 1.0)
    clock.now += 2
    for index in range(3000):
        assert state.add_if_absent_nowait(f"new:{index}", 60.0)
        assert len(state) <= 1000
    assert state.get(state.key("old:0")) is None
    # The newest writes survive an eviction; the oldest went first.
    assert state.add_if_absent_nowait("new:2999", 60.0) is False
    assert state.add_if_absent_nowait("new:0", 60.0) is True


# -- URLs and config ----------------------------------------------------------------------------------
def test_open_state_picks_the_backend_by_url() -> None:
    assert isinstance(open_state("memory://"), MemoryState)
    assert isinstance(open_state("redis://:secret@127.0.0.1:6390/2"), RedisState)
    with pytest.raises(ValueError, match="unsupported state URL scheme mysql") as refused:
        open_state("mysql://user:hunter2@db/x")
    assert "hunter2" not in str(refused.value)


def test_state_config_defaults_to_memory_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APIGATE_STATE_URL", raising=False)
    assert GatewayConfig().state.url == "memory://"
    monkeypatch.setenv("APIGATE_STATE_URL", "redis://cache:6379/1")
    assert StateConfig().url == "redis://cache:6379/1"
    with pytest.raises(ValueError, match="memory://"):
        StateConfig(url="memcached://cache:11211")


def test_the_cli_announces_its_changes_on_the_configs_redis(redis_url: str, tmp_path: Path, run: Run) -> None:
    config = tmp_path / "apigate.yaml"
    store = f"sqlite:///{tmp_path / 'apigate.db'}"
    config.write_text(yaml.safe_dump({"store": {"url": store}, "state": {"url": redis_url}}))
    listener = RedisState(redis_url)

    async def scenario() -> list[Message]:
        await listener.open()
        heard: list[Message] = []
        await listener.subscribe("changes", heard.append)
        await until(lambda: heard == [None])
        commands = (["consumers", "create", "c1"], ["keys", "create", "c1"], ["tokens", "revoke", "j-1"])
        for args in commands:
            done = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "apigate", *args, "-c", str(config), stdout=asyncio.subprocess.DEVNULL
            )
            assert await done.wait() == 0
        await until(lambda: len(heard) == 4)
        await listener.close()
        return heard

    assert run(scenario()) == [None, b"consumer", b"api_key", b"revoked_token"]


def test_services_started_twice_at_once_open_a_policys_redis_once(redis_url: str, run: Run) -> None:
    """Two reloads close together start services concurrently: a state backend a policy names is
    opened once (the second start finds it), not twice with one left open."""
    from apigate.config.models import GatewayConfig
    from apigate.services import Services

    services = Services()
    config = GatewayConfig.model_validate({"routes": []})

    async def scenario() -> list[bool]:
        opened = await asyncio.gather(
            services.start(config, frozenset(), frozenset({redis_url})),
            services.start(config, frozenset(), frozenset({redis_url})),
        )
        assert services.state_at(redis_url) is not None
        await services.stop()
        return list(opened)

    assert sorted(run(scenario())) == [False, True]
