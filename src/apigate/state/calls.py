"""The calls queued for Redis, as objects the connection answers (compiled with the engine).

Every request decided on Redis passes through here twice: its call is made (its keys named under
one hash tag, its command built) and answered (its reply settled into its caller's future). Both
are per request and on the hot path, so this module is compiled; the connection handling around
it (``redis.py``, ``resp.py``) runs per batch.

A call's ``answer`` takes a reply, or an exception (an error reply, a lost connection, no answer
in time), and resolves its caller's future: with the reply, or with what ``settle`` makes of it
(a settled call is handed a ``StateUnavailable`` instead of an exception and decides itself).
Decisions of one loop turn on one server that run the same script become one ``Batch``: one call
of the script's batch form (``Script.batch_lua``), whose list of answers is shared out in order.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Final

from apigate.state.errors import StateUnavailable

# A ``base.Script`` (base.py imports this module, so it is not named here).
Script = Any

# A request waiting on Redis waits at most this long (connect or answer) before it is unavailable.
OPERATION_TIMEOUT: Final = 1.0
# One batch script call decides at most this many calls (a call of ~1 ms on the server).
MAX_BATCH_DECISIONS: Final = 256


def unavailable(where: str, exc: BaseException) -> StateUnavailable:
    """A new error for one caller (each raise adds to its traceback), caused by ``exc``."""
    reason = f"no answer within {OPERATION_TIMEOUT:g}s" if isinstance(exc, TimeoutError) else str(exc)
    error = StateUnavailable(f"Redis at {where}: {type(exc).__name__}: {reason}")
    error.__cause__ = exc
    return error


def same_slot(tag: str, *names: str) -> list[str]:
    """``names`` tagged ``{tag}``, so that they hash to one Redis Cluster slot and one script can
    use them all: ``same_slot("alice", "minute", "hour") == ["{alice}:minute", "{alice}:hour"]``.

    Different tags spread keys over the cluster. A tag that could not serve as a hash tag (empty,
    or holding a brace) is replaced by its SHA-1, so any string (a consumer id) can be a tag.
    """
    return tagged("", tag, names)


def tagged(namespace: str, tag: str, names: Sequence[str]) -> list[str]:
    """``same_slot(tag, *names)``, each key prefixed with ``namespace``."""
    if not tag or "{" in tag or "}" in tag:
        tag = hashlib.sha1(tag.encode()).hexdigest()
    prefix = namespace + "{" + tag + "}:"
    return [prefix + name for name in names]


class Call:
    """One queued operation: its command, its script (for a resend with EVAL), its caller's
    future, how its reply becomes the future's result (``settle``; None: the reply itself), and,
    for a decision that may share a batch, its keys and args."""

    def __init__(
        self,
        command: tuple[Any, ...],
        script: Script | None,
        future: asyncio.Future[Any],
        settle: Callable[[Any], Any] | None,
        where: str,
    ) -> None:
        self.command = command
        self.script = script
        self.future = future
        self.settle = settle
        self.where = where
        self.batchable = False
        self.keys: list[Any] = []
        self.args: Sequence[Any] = ()

    @staticmethod
    def decision(
        script: Script,
        sha: str,
        keys: list[str],
        args: Sequence[Any],
        future: asyncio.Future[Any],
        settle: Callable[[Any], Any],
        where: str,
        batchable: bool,
    ) -> Call:
        # Keys as bytes: any string a request brings (a lone surrogate included) has its bytes, so a
        # key never fails to pack, which would fail the batch it shares with other requests.
        wire_keys: list[Any] = [key.encode("utf-8", "surrogatepass") for key in keys]
        call = Call(("EVALSHA", sha, len(keys), *wire_keys, *args), script, future, settle, where)
        call.batchable = batchable and script.batch_lua is not None
        call.keys = wire_keys
        call.args = args
        return call

    def answer(self, reply: Any) -> None:
        future = self.future
        if future.done():  # its caller was cancelled
            return
        settle = self.settle
        if isinstance(reply, Exception):
            failure = unavailable(self.where, reply)
            if settle is None:
                future.set_exception(failure)
                return
            reply = failure
        if settle is None:
            future.set_result(reply)
            return
        try:
            future.set_result(settle(reply))
        except Exception as exc:  # a bug in the caller's settle: its request fails, nobody else's
            future.set_exception(exc)

    def after_noscript(self) -> Call | None:
        """The command as EVAL with the whole script: what Redis runs (and caches) without its SHA."""
        script = self.script
        if script is None:
            return None
        return Call(("EVAL", script.lua, *self.command[2:]), None, self.future, self.settle, self.where)


class Batch:
    """Decisions of one loop turn that run the same script, as one call of its batch form. Each
    decision still runs whole and alone (the server runs one script at a time) and gets its own
    answer or its own error."""

    def __init__(self, calls: list[Call], command: tuple[Any, ...], script: Script | None) -> None:
        self.calls = calls
        self.command = command
        self.script = script

    def answer(self, reply: Any) -> None:
        calls = self.calls
        if isinstance(reply, list) and len(reply) == len(calls):
            for index in range(len(calls)):
                calls[index].answer(reply[index])
            return
        error = reply if isinstance(reply, Exception) else ValueError(f"a batch got {reply!r}")
        for call in calls:
            call.answer(error)

    def after_noscript(self) -> Batch | None:
        script = self.script
        if script is None:
            return None
        return Batch(self.calls, ("EVAL", script.lua, *self.command[2:]), None)


def batched(calls: list[Call], batch_form: Callable[[Script], tuple[Script, str]]) -> list[Call | Batch]:
    """``calls`` with the decisions that run one script gathered into calls of its batch form
    (``batch_form(script)``: that script and its SHA); calls alone stay as they are."""
    pending: list[Call | Batch] = []
    groups: dict[Script, list[Call]] = {}
    for call in calls:
        script = call.script
        if not call.batchable or script is None:
            pending.append(call)
            continue
        members = groups.get(script)
        if members is None:
            groups[script] = [call]
        else:
            members.append(call)
    for script, members in groups.items():
        if len(members) == 1:
            pending.append(members[0])
            continue
        batch_script, sha = batch_form(script)
        for start in range(0, len(members), MAX_BATCH_DECISIONS):
            part = members[start : start + MAX_BATCH_DECISIONS]
            keys: list[Any] = []
            args: list[Any] = []
            for call in part:
                keys.extend(call.keys)
                args.extend(call.args)
            pending.append(Batch(part, ("EVALSHA", sha, len(keys), *keys, *args), batch_script))
    return pending
