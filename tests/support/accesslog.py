"""The access log made in process: a ``LineMaker``'s rows made lines at once by the formatter
the writing process runs (writer.py), and rows for driving a ``LogPipe``."""

from __future__ import annotations

import functools
from typing import Any

from apigate.config.loader import load_config
from apigate.observe.accesslog.hotpath import Row, RowBuffer, rows_text
from apigate.observe.accesslog.lines import LineMaker
from apigate.observe.accesslog.writer import Formatter, Layout
from tests.support.exchanges import request_exchange


def line_maker(config: Any, lines: list[bytes], **options: Any) -> LineMaker:
    """A ``LineMaker`` for an ``access_log`` config whose lines (as the writing process would
    write them) go to ``lines`` one by one; a row the formatter cannot read fails the test."""
    formatter: Formatter | None = None

    def send(rows: list[Row]) -> None:
        assert formatter is not None
        text, count = formatter.batch(rows_text(rows))
        made = text.splitlines(keepends=True)
        assert len(made) == count == len(rows)
        lines.extend(made)

    maker = LineMaker(config, RowBuffer(1, send), **options)
    formatter = Formatter(maker.layout)
    return maker


@functools.cache
def _default_maker() -> LineMaker:
    return LineMaker(load_config(text="access_log: {}").access_log, RowBuffer(1, list))


def default_layout() -> Layout:
    return _default_maker().layout


def row(request_id: str, path: str = "/") -> Row:
    """The row of a finished GET of ``path`` with the default fields, as a worker makes it."""
    exchange = request_exchange([(b"host", b"gateway.test")], path=path)
    exchange.rid = request_id.encode()
    exchange.trace_id = exchange.rid
    exchange.response_status = 200
    return _default_maker().lines.row(exchange)
