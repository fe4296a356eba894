"""The access log: one JSON line per finished exchange (``access_log:`` in the config).

``AccessLog`` is the Observer: ``apply`` gives the engine a ``LineMaker`` (lines.py) for the
config, whose compiled hook (hotpath.py) puts each exchange's record in the ``LogPipe``'s buffer
(pipe.py); a batch's lines are made in one call (render.py) and go through a pipe to a writing
process (writer.py) that writes them. The pipe outlives
reloads; a reload to another output starts another writing process. ``dropped`` and
``written`` count lines since the worker started; while lines are being dropped, a warning says
how many, at most every ``WARN_EVERY`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from apigate.observe.accesslog.lines import LineMaker
from apigate.observe.accesslog.pipe import LogPipe
from apigate.observe.accesslog.writer import STDOUT, Destination

if TYPE_CHECKING:
    from apigate.config.accesslog import AccessLogConfig
    from apigate.config.models import GatewayConfig
    from apigate.observe.base import FinishHook
    from apigate.services import Services

log = logging.getLogger("apigate.access_log")

WARN_EVERY: Final = 10.0  # seconds between warnings about dropped lines or a failing output
CHECK_EVERY: Final = 1.0  # seconds between looks at the counts (at most: lines are sent each flush_interval)
STOP_TIMEOUT: Final = 3.0  # longest wait, while the worker stops, for queued lines to be written
# Policy settings that name where a credential is read from (key-auth, jwt, hmac-auth...).
_CREDENTIAL_PARAMS: Final = ("query_param",)
_CREDENTIAL_HEADERS: Final = ("header",)


class AccessLog:
    def __init__(self) -> None:
        self.writer: LogPipe | None = None
        self.started = False
        self.watch: asyncio.Task[None] | None = None
        self.reported_drops = 0
        self.warned_at = -WARN_EVERY

    @property
    def dropped(self) -> int:
        return self.writer.dropped if self.writer is not None else 0

    @property
    def written(self) -> int:
        return self.writer.written if self.writer is not None else 0

    def counts(self) -> dict[str, int]:
        return {"access_log_dropped": self.dropped, "access_log_written": self.written}

    def apply(self, config: GatewayConfig) -> FinishHook | None:
        settings = config.access_log
        if not settings.enabled:
            return None
        destination = _destination(settings)
        if self.writer is None:
            self.writer = LogPipe(destination, settings.buffer, settings.flush_interval)
            if self.started:
                self.writer.start()
        else:
            self.writer.configure(destination, settings.buffer, settings.flush_interval)
        params, headers = _credential_names(config)
        return LineMaker(settings, self.writer.lines, params, headers).lines

    async def start(self, config: GatewayConfig, services: Services) -> None:
        self.started = True
        if self.writer is not None:
            self.writer.start()
        self.watch = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watch
        writer = self.writer
        if writer is None:
            return
        unwritten = await writer.stop(STOP_TIMEOUT)
        if unwritten:
            log.warning("access log: the output blocks; %d queued lines not written at stop", unwritten)
        self._report(force=True)

    async def _watch(self) -> None:
        """Send the lines of the last ``flush_interval`` (a quiet gateway's too), and report drops."""
        while True:
            interval = self.writer.flush_interval if self.writer is not None else CHECK_EVERY
            await asyncio.sleep(min(CHECK_EVERY, interval))
            if self.writer is not None:
                self.writer.flush()
            self._report()

    def _report(self, force: bool = False) -> None:
        """Warn about lines dropped since the last warning, and the output's failure, if any."""
        writer = self.writer
        if writer is None:
            return
        now = time.monotonic()
        dropped = writer.dropped
        if dropped == self.reported_drops or (not force and now - self.warned_at < WARN_EVERY):
            return
        error = writer.error
        log.warning(
            "access log: %d lines dropped (%d since start, %d written): %s",
            dropped - self.reported_drops,
            dropped,
            writer.written,
            f"the output failed: {error}" if error is not None else "the output does not keep up",
        )
        self.reported_drops = dropped
        self.warned_at = now


def _destination(settings: AccessLogConfig) -> Destination:
    if settings.output == "stdout":
        return Destination(STDOUT)
    rotate = settings.rotate
    if rotate is None:
        return Destination(settings.output)
    return Destination(settings.output, rotate.max_bytes, rotate.every, rotate.keep)


def _credential_names(config: GatewayConfig) -> tuple[set[str], set[str]]:
    """The query parameters and headers the config's policies read credentials from."""
    params: set[str] = set()
    headers: set[str] = set()
    settings: Iterable[Any] = [
        *config.policies.values(),
        *(value for route in config.routes for value in route.policies.values()),
    ]
    for policy in settings:
        if not isinstance(policy, dict):
            continue
        params.update(v for key in _CREDENTIAL_PARAMS if isinstance(v := policy.get(key), str))
        headers.update(v for key in _CREDENTIAL_HEADERS if isinstance(v := policy.get(key), str))
    return params, headers
