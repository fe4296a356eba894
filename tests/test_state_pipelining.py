"""Redis auto-pipelining, on a real redis-server and a real 3-node Redis Cluster: the calls of one
event-loop turn go out as one pipeline, each gets its own answer or its own error, an unknown
script is resent whole, and a lost or hung Redis fails the batch with StateUnavailable.

Also: the Redis Cluster URL form, and keys named with ``same_slot``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from apigate.config.loader import ConfigError, load_config
from apigate.config.models import StateConfig
from apigate.state import Script, StateUnavailable, check_state_url, open_state, same_slot
from apigate.state.base import LocalData, Message, key_slot
from apigate.state.memory import MemoryState
from apigate.state.redis import MAX_PIPELINE_COMMANDS, OPERATION_TIMEOUT, RedisState, describe
from apigate.state.urls import parse_cluster_url, parse_sentinel_url
from tests.support.redis import RedisServer
from tests.support.redis_cluster import RedisClusterServers
from tests.support.state import Run, until


@pytest.fixture(params=["redis", "cluster"])
def state(request: pytest.FixtureRequest, run: Run) -> Iterator[RedisState]:
    url = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
    backend = RedisState(url)
    run(backend.open())
    yield backend
    run(backend.close())


def script_caches_of(state: RedisState) -> list[redis.Redis]:
    """A plain client for each server the backend uses (each cluster node has its own script cache)."""
    if state.url.startswith("redis+cluster://"):
        nodes = parse_cluster_url(state.url).nodes
        return [redis.Redis(host=host, port=port) for host, port in nodes]
    return [redis.Redis.from_url(state.url)]


class Sent:
    """Pipelines and commands a backend sent since this was made."""

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self.pipelines_before = state.pipelines_sent
        self.commands_before = state.commands_sent

    @property
    def pipelines(self) -> int:
        return self.state.pipelines_sent - self.pipelines_before

    @property
    def commands(self) -> int:
        return self.state.commands_sent - self.commands_before


async def count_up(state: RedisState, calls: int) -> list[int]:
    """``calls`` incr calls in one turn, on keys spread over the cluster, each by its own amount."""
    return list(await asyncio.gather(*(state.incr(f"counter:{index}", index + 1) for index in range(calls))))


def test_the_calls_of_one_turn_go_out_in_one_pipeline_each_with_its_own_answer(
    state: RedisState, run: Run
) -> None:
    async def scenario() -> None:
        first = await count_up(state, 200)  # also caches the script wherever it runs
        assert first == [index + 1 for index in range(200)]
        sent = Sent(state)
        again = await count_up(state, 200)
        assert again == [2 * (index + 1) for index in range(200)]
        assert (sent.pipelines, sent.commands) == (1, 200)

        sent = Sent(state)
        assert await state.add_if_absent("alone", 10) is True  # one call alone is one pipeline too
        assert (sent.pipelines, sent.commands) == (1, 1)

    run(scenario())


def test_a_large_batch_is_split_into_bounded_pipelines(state: RedisState, run: Run) -> None:
    calls = 2 * MAX_PIPELINE_COMMANDS + 10

    async def scenario() -> None:
        await count_up(state, calls)
        sent = Sent(state)
        assert await count_up(state, calls) == [2 * (index + 1) for index in range(calls)]
        assert (sent.pipelines, sent.commands) == (3, calls)

    run(scenario())


def _fail_on_request(data: LocalData, keys: list[str], args: list[Any]) -> int:
    raise AssertionError("not run on memory here")


FAIL_ON_REQUEST = Script(
    lua="""
if ARGV[1] == 'fail' then error('failing on request') end
return redis.call('INCRBY', KEYS[1], ARGV[1])
""",
    python=_fail_on_request,
    batch_lua="""
local function decide(key, amount)
    if amount == 'fail' then error('failing on request') end
    return redis.call('INCRBY', key, amount)
end
local answers = {}
for n = 1, #KEYS do
    local ok, answer = pcall(decide, KEYS[n], ARGV[n])
    if ok then answers[n] = answer else answers[n] = redis.error_reply(tostring(answer)) end
end
return answers
""",
)


def test_a_failing_script_fails_only_its_own_call(state: RedisState, run: Run) -> None:
    async def scenario() -> None:
        arguments = [str(index) for index in range(1, 11)]
        arguments[3] = "fail"
        calls = (
            state.run(FAIL_ON_REQUEST, [f"key:{index}"], [argument])
            for index, argument in enumerate(arguments)
        )
        sent = Sent(state)
        answers = await asyncio.gather(*calls, return_exceptions=True)
        assert sent.commands >= 10  # (and the resend of the ones a node did not know yet)
        failed = answers.pop(3)
        assert isinstance(failed, StateUnavailable) and "failing on request" in str(failed)
        assert answers == [1, 2, 3, 5, 6, 7, 8, 9, 10]

    run(scenario())


def _answer(reply: Any) -> Any:
    """A decision's settle: what the caller sees is the reply, or the outage itself."""
    return reply


def test_decisions_of_one_turn_share_one_script_call_and_each_gets_its_own_answer(
    state: RedisState, run: Run
) -> None:
    """On one server the decisions of a turn that run one script go as one call of its batch form
    (a cluster's keys are in many slots: there each is its own call); each answer is its own, and
    a decision that fails fails alone. A script without a batch form goes call by call."""

    def decide_all(arguments: list[str]) -> list[asyncio.Future[Any]]:
        return [
            state.decide(FAIL_ON_REQUEST, f"tag:{index}", ["counter"], [argument], _answer)
            for index, argument in enumerate(arguments)
        ]

    async def scenario() -> None:
        for _ in range(2):  # connected (the first turn, sent alone), then the batch form cached
            await asyncio.gather(*decide_all(["1"] * 30))
        arguments = [str(index) for index in range(1, 31)]
        arguments[7] = "fail"
        sent = Sent(state)
        answers = await asyncio.gather(*decide_all(arguments))
        clustered = state.url.startswith("redis+cluster://")
        assert (sent.pipelines, sent.commands) == (1, 30 if clustered else 1)
        failed = answers.pop(7)
        assert isinstance(failed, StateUnavailable) and "failing on request" in str(failed)
        assert answers == [2 + index for index in range(1, 31) if index != 8]

        for cache in script_caches_of(state):  # the batch form is resent whole too
            await asyncio.to_thread(cache.script_flush)
            cache.close()
        sent = Sent(state)
        answers = await asyncio.gather(*decide_all(["1"] * 30))
        assert answers[7] == 2 + 1 and answers[0] == 2 + 1 + 1  # the failed call counted nothing
        assert sent.commands == (60 if clustered else 2)

        sent = Sent(state)
        alone = [state.decide(TWO_WINDOWS, f"tag:{index}", ["a", "b"], [], _answer) for index in range(5)]
        assert await asyncio.gather(*alone) == [[1, 1]] * 5
        assert sent.commands >= 5

    run(scenario())


def test_a_script_redis_no_longer_knows_is_resent_whole(state: RedisState, run: Run) -> None:
    async def scenario() -> None:
        await count_up(state, 20)
        for cache in script_caches_of(state):  # as after a restart of Redis
            await asyncio.to_thread(cache.script_flush)
            cache.close()
        sent = Sent(state)
        assert await count_up(state, 20) == [2 * (index + 1) for index in range(20)]
        assert (sent.pipelines, sent.commands) == (2, 40)  # EVALSHA: NOSCRIPT; then EVAL
        sent = Sent(state)
        assert await count_up(state, 20) == [3 * (index + 1) for index in range(20)]
        assert (sent.pipelines, sent.commands) == (1, 20)  # known again

    run(scenario())


def test_a_redis_lost_mid_batch_fails_every_call_then_serves_again(tmp_path: Path, run: Run) -> None:
    server = RedisServer(tmp_path / "redis").start()
    state = RedisState(server.url)

    async def scenario() -> None:
        await state.open()
        assert await count_up(state, 50) == [index + 1 for index in range(50)]
        assert server.proc is not None
        # Stopped, Redis takes the batch into its socket buffer and answers nothing; killed then,
        # it drops the connection with the batch on it.
        os.kill(server.proc.pid, signal.SIGSTOP)
        sent = Sent(state)
        batch = asyncio.ensure_future(count_up(state, 50))
        while sent.pipelines == 0:
            await asyncio.sleep(0)
        started = time.monotonic()
        await asyncio.to_thread(server.kill)
        with pytest.raises(StateUnavailable) as lost:
            await batch
        assert isinstance(lost.value.__cause__, redis.ConnectionError), lost.value  # not a timeout
        assert time.monotonic() - started < OPERATION_TIMEOUT
        answers = await asyncio.gather(
            *(state.incr(f"counter:{index}") for index in range(5)), return_exceptions=True
        )
        assert all(isinstance(answer, StateUnavailable) for answer in answers)

        await asyncio.to_thread(server.start)
        assert await count_up(state, 50) == [index + 1 for index in range(50)]  # an empty Redis again
        await state.close()

    try:
        run(scenario())
    finally:
        server.kill()


def test_a_batch_unanswered_in_time_is_unavailable_and_leaves_no_stale_reply(
    tmp_path: Path, run: Run
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    state = RedisState(server.url)
    assert server.proc is not None
    pid = server.proc.pid

    async def scenario() -> None:
        await state.open()
        await count_up(state, 10)
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        answers = await asyncio.gather(
            *(state.incr(f"hung:{index}") for index in range(10)), return_exceptions=True
        )
        waited = time.monotonic() - started
        assert all(isinstance(answer, StateUnavailable) for answer in answers), answers
        assert OPERATION_TIMEOUT - 0.05 < waited < OPERATION_TIMEOUT + 0.5, waited
        os.kill(pid, signal.SIGCONT)
        # The unanswered batch's connection was dropped: its late replies reach nobody.
        assert await count_up(state, 10) == [2 * (index + 1) for index in range(10)]
        await state.close()

    try:
        run(scenario())
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()


def test_a_connection_that_meets_a_read_only_replica_is_dropped(run: Run) -> None:
    """After a failover the old master may still take connections, answering READONLY to writes:
    the connection is dropped, so the next batch connects afresh (to the master Sentinel names)."""

    async def answer_read_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(65536):
            writer.write(b"-READONLY You can't write against a read only replica.\r\n")
            await writer.drain()
        writer.close()

    connections: list[asyncio.StreamWriter] = []

    async def scenario() -> None:
        server = await asyncio.start_server(answer_read_only, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        state = RedisState(f"redis://127.0.0.1:{port}/0")
        await state.open()  # its PING (through redis-py) is answered READONLY too: logged, not fatal
        before = len(connections)
        for attempt in range(1, 3):
            with pytest.raises(StateUnavailable, match="READONLY"):
                await state.incr("counter")
            # Each call went over a new connection, which the gateway then closed.
            opened = before + attempt
            await until(lambda: len(connections) == opened and connections[-1].is_closing())  # noqa: B023
        await state.close()
        server.close()

    run(scenario())


def test_a_call_that_cannot_be_sent_fails_alone_and_later_replies_stay_matched(
    redis_url: str, run: Run
) -> None:
    """A command that cannot be packed fails its own call; nothing is queued for it, so the next
    calls get their own replies. A key with a lone surrogate is sent as its bytes."""
    state = RedisState(redis_url)

    async def scenario() -> None:
        await state.open()
        assert await state.incr("first") == 1  # connected
        with pytest.raises(StateUnavailable):
            await state.run(FAIL_ON_REQUEST, ["odd"], [{"not": "packable"}])
        assert await state.incr("first") == 2
        odd = state.decide(FAIL_ON_REQUEST, "tag\udcff\ud800", ["counter"], [5], _answer)
        assert await odd == 5
        assert [await state.incr("first"), await state.incr("second")] == [3, 1]
        await state.close()

    run(scenario())


def test_a_script_resend_is_answered_when_the_connection_ends_in_the_same_read(run: Run) -> None:
    """NOSCRIPT for one call and READONLY for the next in one read: the connection is dropped, and
    the call that waited to be sent again is answered too (it used to wait forever)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            writer.write(b"-NOSCRIPT No matching script.\r\n-READONLY You can't write.\r\n")
            await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        state = RedisState(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0")
        await state.open()
        both = [state.run(FAIL_ON_REQUEST, ["a"], [1]), state.run(FAIL_ON_REQUEST, ["b"], [1])]
        done = await asyncio.wait_for(asyncio.gather(*both, return_exceptions=True), OPERATION_TIMEOUT)
        assert all(isinstance(answer, StateUnavailable) for answer in done), done
        await state.close()
        server.close()

    run(scenario())


# -- Redis Cluster ------------------------------------------------------------------------------------
def _window_locally(data: LocalData, keys: list[str], args: list[Any]) -> list[int]:
    minute = int(data.get(keys[0]) or 0) + 1
    hour = int(data.get(keys[1]) or 0) + 1
    data.set(keys[0], minute)
    data.set(keys[1], hour)
    return [minute, hour]


TWO_WINDOWS = Script(
    lua="""
return {redis.call('INCR', KEYS[1]), redis.call('INCR', KEYS[2])}
""",
    python=_window_locally,
)


def test_a_script_on_keys_of_one_slot_runs_on_their_node_across_the_cluster(
    redis_cluster: RedisClusterServers, redis_cluster_url: str, run: Run
) -> None:
    consumers = [f"consumer-{index}" for index in range(12)]
    state = RedisState(redis_cluster_url)

    async def scenario() -> list[list[int]]:
        await state.open()
        calls = [state.run(TWO_WINDOWS, same_slot(name, "minute", "hour")) for name in consumers]
        first = await asyncio.gather(*calls)
        sent = Sent(state)
        calls = [state.run(TWO_WINDOWS, same_slot(name, "minute", "hour")) for name in consumers]
        second = await asyncio.gather(*calls)
        assert (sent.pipelines, sent.commands) == (1, len(consumers))  # one pipeline over every node
        await state.close()
        return [*first, *second]

    assert run(scenario()) == [[1, 1]] * len(consumers) + [[2, 2]] * len(consumers)
    nodes = {redis_cluster.node_of(state.key(same_slot(name, "minute")[0])) for name in consumers}
    assert nodes == {node.port for node in redis_cluster.nodes}  # the tags spread over the cluster


def test_a_subscription_moves_to_another_node_when_its_node_is_lost(tmp_path: Path, run: Run) -> None:
    cluster = RedisClusterServers(tmp_path / "cluster").start()
    state = RedisState(cluster.url)

    async def scenario() -> None:
        await state.open()
        heard: list[Message] = []
        subscription = await state.subscribe("changes", heard.append)
        await until(lambda: subscription.active and heard == [None])
        await asyncio.to_thread(cluster.nodes[0].kill)  # the first startup node: the one it is on
        await until(lambda: not subscription.active and heard == [None, None])
        await until(lambda: subscription.active and heard == [None, None, None])  # on another node
        with redis.Redis(port=cluster.nodes[2].port) as other_node:
            await asyncio.to_thread(other_node.publish, state.key("changes"), b"after the loss")
        await until(lambda: heard[-1] == b"after the loss")
        await state.close()

    try:
        run(scenario())
    finally:
        cluster.stop()


def test_keys_of_one_call_must_share_a_slot_on_every_backend(redis_url: str, run: Run) -> None:
    spread = ["minute:alice", "hour:alice"]
    assert key_slot("apigate:" + spread[0]) != key_slot("apigate:" + spread[1])
    for backend in (MemoryState(), RedisState(redis_url)):

        async def scenario(backend: MemoryState | RedisState = backend) -> None:
            await backend.open()
            with pytest.raises(ValueError, match="same_slot"):
                await backend.run(TWO_WINDOWS, spread)
            assert await backend.run(TWO_WINDOWS, same_slot("alice", "minute", "hour")) == [1, 1]
            await backend.close()

        run(scenario())


def test_same_slot_tags_keys_and_takes_any_string_as_a_tag() -> None:
    assert same_slot("alice", "minute", "hour") == ["{alice}:minute", "{alice}:hour"]
    for tag in ("", "}", "a}b", "{x}", "ünï"):
        keys = [f"apigate:{key}" for key in same_slot(tag, "minute", "hour", "day")]
        assert len({key_slot(key) for key in keys}) == 1, tag
    assert same_slot("", "x") != same_slot("}", "x")
    slots = {key_slot(same_slot(f"consumer-{index}", "minute")[0]) for index in range(100)}
    assert len(slots) > 90


# -- URLs ---------------------------------------------------------------------------------------------
def assert_refused_without_password(refused: dict[str, str]) -> None:
    """Each URL is refused for its reason, and the message does not quote its password."""
    for bad, reason in refused.items():
        with pytest.raises(ValueError, match=reason) as caught:
            check_state_url(bad)
        assert "hunter2" not in str(caught.value)
        with pytest.raises(ValueError, match=reason):
            StateConfig(url=bad)


def test_cluster_urls_are_read_and_bad_ones_refused_without_their_password() -> None:
    url = "rediss+cluster://:s3cr%40t@10.0.0.1:7000,10.0.0.2,[::1]:7002/"
    cluster = parse_cluster_url(url)
    assert cluster.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (cluster.username, cluster.password, cluster.tls) == (None, "s3cr@t", True)
    assert describe(url) == "10.0.0.1:7000,10.0.0.2:6379,::1:7002 (cluster)"
    assert parse_cluster_url("redis+cluster://app:pw@h:1").username == "app"
    assert isinstance(open_state("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001"), RedisState)
    assert StateConfig(url="redis+cluster://h1:7000,h2:7000").url == "redis+cluster://h1:7000,h2:7000"
    refused = {
        "redis+cluster://:hunter2@h1:7000/3": "only database 0",
        "redis+cluster://:hunter2@h1:70000": "port",
        "redis+cluster://:hunter2@h1:7000,,h2:7000": "host:port",
        "redis+cluster://:hunter2@h1:7000?ssl=1": "no query",
    }
    assert_refused_without_password(refused)


def test_sentinel_urls_are_read_and_bad_ones_refused_without_their_password() -> None:
    url = "rediss+sentinel://app:s3cr%40t@10.0.0.1:26380,10.0.0.2/mymaster/2"
    watched = parse_sentinel_url(url)
    assert watched.nodes == (("10.0.0.1", 26380), ("10.0.0.2", 26379))
    assert (watched.service, watched.db, watched.username, watched.password, watched.tls) == (
        "mymaster",
        2,
        "app",
        "s3cr@t",
        True,
    )
    assert watched.server_url("10.0.0.9", 6380) == "rediss://app:s3cr%40t@10.0.0.9:6380/2"
    assert watched.server_url("fd00::9", 6380) == "rediss://app:s3cr%40t@[fd00::9]:6380/2"
    assert describe(url) == "10.0.0.1:26380,10.0.0.2:26379 (sentinel, mymaster)"
    assert isinstance(open_state("redis+sentinel://127.0.0.1:26379/mymaster"), RedisState)
    refused = {
        "redis+sentinel://:hunter2@h1:26379": "names the service",
        "redis+sentinel://:hunter2@h1:26379/mymaster/x": "database is a number",
        "redis+sentinel://:hunter2@h1:99999/mymaster": "port",
        "redis+sentinel://:hunter2@h1/mymaster?ssl=1": "no query",
    }
    assert_refused_without_password(refused)


def test_a_bad_state_url_in_a_config_is_reported_at_its_field(tmp_path: Path) -> None:
    config = tmp_path / "apigate.yaml"
    config.write_text("state:\n  url: redis+cluster://:hunter2@cache:7000/1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert "state.url" in message and "only database 0" in message and "hunter2" not in message
