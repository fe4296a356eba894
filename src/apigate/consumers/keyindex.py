"""The usable API keys as key-auth reads them on every request, compiled with mypyc (setup.py).

``KeyIndex`` maps a key's HMAC digest to its ``KeyMatch``, and remembers presented keys it has
matched so that a repeated key costs one dict probe and no HMAC; the key matched last costs one
comparison and no hashing (a client sends its key again and again, on a kept-alive connection
or from an SDK's pool). The consumer registry builds the matches and swaps a new map in on every
reload; the remembered keys go with it, so a revoked, expired or changed key is never found once
rebuilt.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, Final

from apigate.consumers.windows import Schedule
from apigate.httpspec import address_in
from apigate.store.roles.consumers import ApiKey, Consumer

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Presented keys longer than this are refused without hashing (generated keys are 35 chars).
MAX_KEY_BYTES: Final = 512
# Presented keys remembered with their match (their HMAC skipped) until the next rebuild.
RECENT_KEYS: Final = 10000


def header_value(text: str | None) -> bytes | None:
    """``text`` as a header value, or None if it has none or holds control characters."""
    if not text:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return None
    return text.encode()


class KeyMatch:
    """A usable key with its consumer, and what the policy checks precomputed.

    ``deadline``: the earliest of expires_at and revoked_at (None if neither), so a request
    checks the clock only for keys that have one. ``networks``/``schedule`` are None when the
    key has no CIDR or time restriction; ``unconditional`` is true when all three are None.
    """

    def __init__(self, key: ApiKey, consumer: Consumer, declared: bool = False) -> None:
        self.key = key
        self.consumer = consumer
        self.consumer_id: str = consumer.id
        self.tenant: str | None = consumer.tenant
        self.declared = declared
        self.scopes: frozenset[str] = frozenset(key.scopes)
        self.networks: tuple[Network, ...] | None = (
            tuple(ipaddress.ip_network(c, strict=False) for c in key.allowed_cidrs)
            if key.allowed_cidrs
            else None
        )
        self.schedule: Schedule | None = Schedule.parse(key.time_windows) if key.time_windows else None
        ends = [t for t in (key.expires_at, key.revoked_at) if t is not None]
        self.deadline: float | None = min(ends) if ends else None
        self.unconditional: bool = self.deadline is None and self.networks is None and self.schedule is None
        self.consumer_id_value = header_value(consumer.id)
        self.tenant_value = header_value(consumer.tenant)
        self.key_id_value = header_value(key.id)
        self.groups_value = header_value(",".join(consumer.groups))
        # What an accepted key gives the request's shared variables (copied: a request may add to them).
        self.variables: dict[str, Any] = {"scopes": self.scopes, "key_id": key.id}
        # The header pairs each key-auth configuration forwards for this key, made on first use.
        self.forwards: dict[bytes, list[tuple[bytes, bytes]]] = {}

    def allows_ip(self, ip: str) -> bool:
        networks = self.networks
        if networks is None:
            return True
        return address_in(ip, networks)

    def __repr__(self) -> str:
        return f"<KeyMatch {self.key.id} of {self.consumer.id}>"


def _no_digest(_key: bytes) -> bytes:
    return b""


class KeyIndex:
    """Matches by digest, and presented keys already matched. ``live`` turns false when the
    registry that fills it stops, so that a holder of the index looks for the current one."""

    def __init__(self) -> None:
        self.digest: Callable[[bytes], bytes] = _no_digest  # the keyed hash, set once loaded
        self.by_digest: dict[bytes, KeyMatch] = {}
        self.recent: dict[bytes, KeyMatch] = {}
        self.last_key = b""  # the key matched last, and its match (None: no key matched yet)
        self.last_match: KeyMatch | None = None
        self.live = True

    def replace(self, by_digest: dict[bytes, KeyMatch]) -> None:
        """A rebuild: new matches, nothing remembered."""
        self.by_digest = by_digest
        self.recent = {}
        self.last_key = b""
        self.last_match = None

    def lookup(self, presented_key: bytes) -> KeyMatch | None:
        """The key's match if it is known (the caller checks deadline, CIDRs, windows, scopes)."""
        if presented_key == self.last_key and self.last_match is not None:
            return self.last_match
        match = self.recent.get(presented_key)
        if match is None:
            if len(presented_key) > MAX_KEY_BYTES:
                return None
            match = self.by_digest.get(self.digest(presented_key))
            if match is None:
                return None
            if len(self.recent) >= RECENT_KEYS:
                self.recent = {}  # many distinct keys: start over rather than track use
            self.recent[presented_key] = match
        self.last_key = presented_key
        self.last_match = match
        return match
