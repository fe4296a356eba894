"""The contract between the process and what watches finished exchanges."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.engine.exchange import Exchange
    from apigate.services import Services

FinishHook = Callable[["Exchange"], None]


@dataclass(frozen=True)
class SampledHook:
    """A hook for the finished exchanges whose trace is sampled (span export): the engine reads
    the flag itself, so the others cost no call (with 1 % sampled, a call of a Python hook for
    every request cost about as much as the spans of the sampled ones)."""

    hook: FinishHook


class Observer(Protocol):
    """Lives as long as the worker: a reload calls ``apply`` again, it never rebuilds the observer
    (a log file, a writer thread or an unsent batch is kept)."""

    def apply(self, config: GatewayConfig) -> FinishHook | SampledHook | None:
        """Take ``config``; the hook the engine calls for every finished exchange (or, wrapped in
        ``SampledHook``, for the sampled ones), or None when this observer is off. Runs on the
        event loop: the hook must not block or await."""

    async def start(self, config: GatewayConfig, services: Services) -> None:
        """Start what runs in the background (a writer, a flush timer); ``services`` opens the
        store or the state backend for an observer that needs one. Called once, before serving."""

    async def stop(self) -> None:
        """Flush what is pending and stop; called once, while the worker drains."""

    def counts(self) -> dict[str, int]:
        """Monotonic counts to show as metrics (``{"access_log_dropped": 3}`` becomes
        ``apigate_access_log_dropped_total``); names unique across observers."""
