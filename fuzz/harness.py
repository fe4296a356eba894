"""What every fuzz target shares: running a ``check(data)`` under atheris, and the head reader
comparison with llhttp.

A target is one file in this folder that defines ``check(data: bytes) -> None`` (raising on a
finding) and ends with ``if __name__ == "__main__": fuzz(check)``; its seed inputs live in
``fuzz/corpus/<file name without .py>/``. tests/test_fuzz.py finds targets by that shape.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import FunctionType, ModuleType

import httptools

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the llhttp reading lives with the head reader's tests
    sys.path.insert(0, str(ROOT))

from tests.test_heads import Recorder  # noqa: E402

# Set by tests/test_fuzz.py when PYTHONPATH points at a compiled build: then the compiled head
# reader must be the one imported, so that a failed build cannot pass as a pure-Python run.
REQUIRE_COMPILED = os.environ.get("APIGATE_FUZZ_REQUIRE_COMPILED") == "1"
LIMITS = (8192, 64)


def fuzz(check: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


def head_readers() -> list[ModuleType]:
    """The Python source of engine/heads.py, and the importable one too when it is compiled."""
    import atheris

    path = ROOT / "src" / "apigate" / "engine" / "heads.py"
    spec = importlib.util.spec_from_file_location("heads_source", path)
    assert spec is not None and spec.loader is not None
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    # Loaded from its path, the module bypasses atheris's import hook: instrument its functions
    # in place, so that calls between them (looked up in the module) are instrumented too.
    for name, value in vars(source).items():
        if isinstance(value, FunctionType):
            setattr(source, name, atheris.instrument_func(value))
    from apigate.engine import heads

    assert heads.COMPILED or not REQUIRE_COMPILED, f"not the compiled head reader: {heads.__file__}"
    return [source, heads] if heads.COMPILED else [source]


class _Ends(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.body = b""
        self.complete = False

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def llhttp_completes(parser_type: type, data: bytes) -> tuple[bool, bytes]:
    """Whether llhttp reads a whole first message in ``data``, and that message's body."""
    recorder = _Ends()
    recorder.parser = parser = parser_type(recorder)
    with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
        parser.feed_data(data)
    return recorder.complete, recorder.body


def check_head(
    readers: list[ModuleType],
    data: bytes,
    read: str,
    parser_type: type,
    llhttp: Callable[[bytes], tuple | None],
    fields: int,
) -> None:
    """Every reader answers alike; an accepted head is read by llhttp the same way, and its body
    (of the length the reader says) ends exactly where llhttp ends the message."""
    for limit in LIMITS:
        answers = [getattr(reader, read)(data, limit) for reader in readers]
        got = answers[0]
        assert all(answer == got for answer in answers), (data, answers)
        if got is None:
            continue
        length, end = got[-2], got[-1]
        assert end <= min(len(data), limit), (data, got)
        message = data[: end + length]  # llhttp's callbacks would run on into a pipelined message
        assert llhttp(message) == got[:fields], (data, got, llhttp(message))
        if len(message) == end + length:
            assert llhttp_completes(parser_type, message) == (True, data[end : end + length]), (data, got)
            if length:
                assert not llhttp_completes(parser_type, message[:-1])[0], (data, got)
