"""The policy contract: declared phases must match the hooks a class defines, the engine gets
each phase's hooks from the declaration (compiled ones where a policy has them), and a config
that leaves a phase or a service unused narrows them for its instance."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from apigate.config.compile import compile_plan, needs_of
from apigate.config.loader import ConfigError, load_config
from apigate.engine.exchange import CompiledRequestHook, Exchange
from apigate.engine.plan import Plan
from apigate.engine.upstream import PoolManager
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.key_auth.hotpath import KeyCheck
from apigate.policies.registry import register, registry
from apigate.policies.transform.hotpath import CompiledEdits


class NoConfig(PolicyConfig):
    pass


def test_a_declared_phase_without_its_hook_is_refused_at_registration() -> None:
    class BodyWithoutHook(Policy[NoConfig]):
        name = "test_contract_body_without_hook"
        order = 1000
        Config = NoConfig
        phases = frozenset({"request", "body"})

        def on_request(self, exchange: Exchange) -> None:
            return None

    with pytest.raises(TypeError) as caught:
        register(BodyWithoutHook)
    assert str(caught.value) == (
        "policy 'test_contract_body_without_hook' declares the 'body' phase but defines no on_body"
    )
    assert "test_contract_body_without_hook" not in registry()


def test_a_hook_whose_phase_is_not_declared_is_refused_at_registration() -> None:
    class UndeclaredResponse(Policy[NoConfig]):
        name = "test_contract_undeclared_response"
        order = 1000
        Config = NoConfig
        phases = frozenset({"request"})

        def on_request(self, exchange: Exchange) -> None:
            return None

        def on_response(self, exchange: Exchange) -> None:
            exchange.response_headers = []

    with pytest.raises(TypeError) as caught:
        register(UndeclaredResponse)
    assert str(caught.value) == (
        "policy 'test_contract_undeclared_response' defines on_response but does not declare "
        "the 'response' phase in `phases`"
    )
    assert "test_contract_undeclared_response" not in registry()


def test_a_plugin_whose_phases_disagree_with_its_hooks_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "contract_plugin_undeclared.py").write_text(
        "from apigate.policies.base import Policy, PolicyConfig\n"
        "from apigate.policies.registry import register\n"
        "class Empty(PolicyConfig):\n"
        "    pass\n"
        "@register\n"
        "class Logs(Policy[Empty]):\n"
        "    name = 'test_contract_plugin_logs'\n"
        "    order = 1000\n"
        "    Config = Empty\n"
        "    def on_log(self, exchange):\n"
        "        return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_config(text="plugins: [contract_plugin_undeclared]\nroutes: []\n", environ={})
    message = str(caught.value)
    assert "plugins[0]" in message
    assert "defines on_log but does not declare the 'log' phase" in message


@pytest.fixture
def pools() -> Iterator[PoolManager]:
    loop = asyncio.new_event_loop()
    yield PoolManager(loop)
    loop.close()


def _plan(routes: str, pools: PoolManager) -> Plan:
    return compile_plan(load_config(text=f"routes:\n{routes}", environ={}), pools)


def test_the_engine_calls_the_compiled_hooks_directly(pools: PoolManager) -> None:
    plan = _plan(
        "  - path: /keys\n"
        "    target: http://127.0.0.1:9\n"
        "    policies: {key-auth: {}}\n"
        "  - path: /edits\n"
        "    target: http://127.0.0.1:9\n"
        "    policies: {headers: {request: {set: {x-a: b}}, response: {remove: [server]}}}\n",
        pools,
    )
    keys, edits = plan.routes
    # Compiled hotpath classes, or their bound methods: no Python frame of the policy in between.
    # A CompiledRequestHook is called natively by the engine (its ``run``).
    assert [type(hook) for hook in keys.request_hooks] == [KeyCheck]
    assert isinstance(keys.request_hooks[0], CompiledRequestHook)
    assert [type(hook.__self__) for hook in edits.request_hooks] == [CompiledEdits]
    assert [type(hook.__self__) for hook in edits.response_hooks] == [CompiledEdits]
    assert keys.response_hooks == () and keys.body_hooks == () and edits.log_hooks == ()


def test_a_config_narrows_its_instance_phases_and_needs(pools: PoolManager) -> None:
    plan = _plan(
        "  - path: /streamed\n"
        "    target: http://127.0.0.1:9\n"
        "    policies: {hmac-auth: {credentials: {}}}\n"
        "  - path: /buffered\n"
        "    target: http://127.0.0.1:9\n"
        "    policies: {hmac-auth: {credentials: {}, validate_body: true}}\n"
        "  - path: /tokens\n"
        "    target: http://127.0.0.1:9\n"
        "    policies: {jwt: {algorithms: [HS256], secret: '" + "s" * 32 + "'}}\n",
        pools,
    )
    streamed, buffered, tokens = plan.routes
    assert (len(streamed.request_hooks), streamed.body_hooks, streamed.body_limit) == (1, (), 0)
    assert (len(buffered.request_hooks), len(buffered.body_hooks), buffered.body_limit) == (1, 1, 1 << 20)
    assert tokens.policies[0].needs == frozenset()
    assert needs_of(plan) == frozenset({"consumers", "state"})  # hmac-auth's; jwt without check_revoked
