"""DNS service discovery: an upstream's targets from A, AAAA or SRV records, asked again as their TTLs
run out.

``resolve(query)`` asks once and returns the endpoints with the time to wait before asking again;
``DnsWatcher`` keeps asking for as long as it runs and hands each new set to its caller. Queries go
through dnspython's asyncio resolver, so nothing here blocks the event loop.

What counts as an answer:

- ``A``, ``AAAA``: the addresses, each with the query's port and weight 1. ``A+AAAA`` asks both at
  once; one family without records is fine, both without is not.
- ``SRV`` (RFC 2782): the records of the lowest priority value only, each with its own port and
  weight. When every one of them has weight 0 they share evenly (weight 1 each); among weighted
  records a 0 stays 0 (RFC 2782: "a very small chance of being selected"; the balancer decides).
  A target's addresses come from the answer's additional section when the server sent them, else
  from A and AAAA queries, and each address carries its record's weight. A target name that does
  not exist (or has no address) is left out and the others are used. A sole target ``.`` means
  the service is decidedly not available: an empty set, and a successful answer.
- Anything else raises ``DnsError``: NXDOMAIN, an answer without records, SERVFAIL, no answer in
  ``timeout``. An empty set from a failing server must not empty an upstream: the caller keeps its
  last good set.

The wait before the next resolution is the smallest TTL of the records used (CNAMEs on the way
included), held within [min_ttl, max_ttl]: a TTL of 0 must not make apigate ask in a loop, and a
day-long one must not hide a change for a day.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

log = logging.getLogger("apigate")

RecordType = Literal["A", "AAAA", "A+AAAA", "SRV"]
RECORD_TYPES: tuple[str, ...] = get_args(RecordType)
_FAMILIES: dict[str, tuple[str, ...]] = {"A": ("A",), "AAAA": ("AAAA",), "A+AAAA": ("A", "AAAA")}
_ADDRESS_TYPES = frozenset({dns.rdatatype.A, dns.rdatatype.AAAA})


class DnsError(Exception):
    """A resolution that gave no usable set of endpoints: the caller keeps the last good one."""

    def __init__(self, name: str, record: str, reason: str) -> None:
        super().__init__(f"DNS {record} query for {name}: {reason}")
        self.name = name
        self.record = record
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address to send traffic to; ``host`` is an IP address."""

    host: str
    port: int
    weight: int = 1


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _is_seconds(value: object) -> bool:
    """A finite number of seconds above 0 (a bool is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _name_problem(name: object) -> str | None:
    """Why ``name`` cannot be asked about, or None. Messages never repeat the value (it is config)."""
    if not isinstance(name, str) or not name.strip("."):
        return "must be a DNS name such as users.internal or _http._tcp.users.internal"
    if any(character.isspace() or not character.isprintable() for character in name):
        return "must be a DNS name without spaces or control characters"
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return "is an IP address; list it as a target instead of asking DNS for it"
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException as error:
        return f"is not a valid DNS name ({error})"
    return None


def _nameservers(value: object) -> tuple[tuple[str, int], ...]:
    """The nameservers as a tuple of (IP address, port) pairs, or ValueError naming the bad entry."""
    if not isinstance(value, tuple | list):
        raise ValueError("nameservers: must be a list of (IP address, port) pairs")
    pairs = []
    for index, entry in enumerate(value):
        field = f"nameservers[{index}]"
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise ValueError(f"{field}: must be an (IP address, port) pair")
        host, port = entry
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{field}: the host must be an IP address (a nameserver is not looked up)"
            ) from None
        if not _is_port(port):
            raise ValueError(f"{field}: the port must be an integer from 1 to 65535")
        pairs.append((str(host), int(port)))
    return tuple(pairs)


@dataclass(frozen=True)
class DnsQuery:
    """What to ask DNS for an upstream's targets, and how often.

    ``port`` is the targets' port for A and AAAA records (SRV records carry their own);
    ``nameservers`` are (IP address, port) pairs, empty for the system's (/etc/resolv.conf, whose
    search domains then apply to a name without a final dot). TTLs and ``timeout`` are seconds.
    """

    name: str
    record: RecordType
    port: int | None = None
    nameservers: tuple[tuple[str, int], ...] = ()
    min_ttl: float = 1.0
    max_ttl: float = 300.0
    timeout: float = 2.0

    def __post_init__(self) -> None:
        problem = _name_problem(self.name)
        if problem:
            raise ValueError(f"name: {problem}")
        if self.record not in RECORD_TYPES:
            raise ValueError(f"record: must be one of {', '.join(RECORD_TYPES)}")
        if self.port is None and self.record != "SRV":
            raise ValueError(f"port: required with record {self.record} (only SRV records carry ports)")
        if self.port is not None and not _is_port(self.port):
            raise ValueError("port: must be an integer from 1 to 65535")
        # Frozen: normalise the pairs to tuples so that the query stays hashable.
        object.__setattr__(self, "nameservers", _nameservers(self.nameservers))
        if not _is_seconds(self.min_ttl):
            raise ValueError("min_ttl: must be a number of seconds above 0 (0 would ask again at once)")
        if not _is_seconds(self.max_ttl) or self.max_ttl < self.min_ttl:
            raise ValueError("max_ttl: must be a number of seconds, at least min_ttl")
        if not _is_seconds(self.timeout):
            raise ValueError("timeout: must be a number of seconds above 0")


class _Addresses(NamedTuple):
    """The addresses found for one name and the smallest TTL among the records that gave them."""

    addresses: tuple[str, ...]
    ttl: float


_NONE_FOUND = _Addresses((), math.inf)


def _resolver(query: DnsQuery) -> dns.asyncresolver.Resolver:
    if query.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in query.nameservers]
    else:
        resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
    resolver.lifetime = query.timeout
    # Two tries per nameserver within the deadline: one lost datagram is not a failed resolution.
    resolver.timeout = query.timeout / 2
    resolver.cache = None  # every resolution asks: the TTL schedule is ours
    return resolver


async def _lookup_addresses(
    resolver: dns.asyncresolver.Resolver, name: str | dns.name.Name, families: Sequence[str]
) -> _Addresses:
    """The addresses of ``name`` in each family, asked at once; a family without records adds none."""
    answers = await asyncio.gather(
        *(resolver.resolve(name, family, search=True, raise_on_no_answer=False) for family in families),
        return_exceptions=True,  # wait for every query, so that none runs on unobserved
    )
    addresses: list[str] = []
    ttl = math.inf
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
        if answer.rrset is not None:
            addresses.extend(rdata.address for rdata in answer.rrset)
            # The chain's smallest TTL: a CNAME on the way may expire before the addresses do.
            ttl = min(ttl, answer.chaining_result.minimum_ttl)
    return _Addresses(tuple(addresses), ttl)


def _additional_addresses(response: dns.message.Message) -> dict[dns.name.Name, _Addresses]:
    """The A and AAAA records a server sent along with an SRV answer, by owner name."""
    found: dict[dns.name.Name, _Addresses] = {}
    for rrset in response.additional:
        if rrset.rdtype in _ADDRESS_TYPES:
            addresses, ttl = found.get(rrset.name, _NONE_FOUND)
            found[rrset.name] = _Addresses(
                (*addresses, *(rdata.address for rdata in rrset)), min(ttl, rrset.ttl)
            )
    return found


async def _target_addresses(
    resolver: dns.asyncresolver.Resolver, target: dns.name.Name, sent_along: dict[dns.name.Name, _Addresses]
) -> _Addresses:
    if target in sent_along:
        return sent_along[target]
    try:
        return await _lookup_addresses(resolver, target, ("A", "AAAA"))
    except dns.resolver.NXDOMAIN:
        return _NONE_FOUND  # a target that is gone; the others still serve


async def _resolve_srv(query: DnsQuery, resolver: dns.asyncresolver.Resolver) -> tuple[list[Endpoint], float]:
    answer = await resolver.resolve(query.name, "SRV", search=True)
    assert answer.rrset is not None  # an answer without records raised NoAnswer
    ttl = answer.chaining_result.minimum_ttl
    records = [record for record in answer.rrset if record.target != dns.name.root]
    if not records:
        return [], ttl  # RFC 2782: a target of "." says the service is decidedly not available
    lowest = min(record.priority for record in records)
    records = [record for record in records if record.priority == lowest]
    sent_along = _additional_addresses(answer.response)
    targets = list(dict.fromkeys(record.target for record in records))
    found = dict(
        zip(
            targets,
            await asyncio.gather(*(_target_addresses(resolver, target, sent_along) for target in targets)),
            strict=True,
        )
    )
    records = [record for record in records if found[record.target].addresses]
    if not records:
        names = ", ".join(target.to_text() for target in targets)
        raise DnsError(query.name, query.record, f"no SRV target has an address ({names})")
    # RFC 2782: weight 0 everywhere means no preference, so they share evenly.
    even = all(record.weight == 0 for record in records)
    endpoints = [
        Endpoint(address, record.port, 1 if even else record.weight)
        for record in records
        for address in found[record.target].addresses
    ]
    return endpoints, min(ttl, *(found[record.target].ttl for record in records))


async def _resolve_addresses(
    query: DnsQuery, resolver: dns.asyncresolver.Resolver
) -> tuple[list[Endpoint], float]:
    assert query.port is not None  # DnsQuery requires it for these record types
    found = await _lookup_addresses(resolver, query.name, _FAMILIES[query.record])
    if not found.addresses:
        raise DnsError(
            query.name, query.record, f"the name has no {' or '.join(_FAMILIES[query.record])} records"
        )
    return [Endpoint(address, query.port) for address in found.addresses], found.ttl


def _merged(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """Sorted by address and port, one endpoint per address and port (two SRV records naming one
    address add up their weights: the address takes both shares)."""
    weights: dict[tuple[str, int], int] = {}
    for endpoint in endpoints:
        key = (endpoint.host, endpoint.port)
        weights[key] = weights.get(key, 0) + endpoint.weight

    def order(key: tuple[str, int]) -> tuple[int, int, int]:
        address = ipaddress.ip_address(key[0])
        return address.version, int(address), key[1]

    return [Endpoint(host, port, weights[host, port]) for host, port in sorted(weights, key=order)]


def _failure(error: dns.exception.DNSException, query: DnsQuery) -> str:
    """What went wrong, said for an operator."""
    if isinstance(error, dns.resolver.NXDOMAIN):
        return "no such name (NXDOMAIN)"
    if isinstance(error, dns.resolver.NoAnswer):
        return f"the name has no {query.record} records"
    if isinstance(error, dns.exception.Timeout):
        return f"no answer within {query.timeout:g}s"
    if isinstance(error, dns.resolver.NoNameservers):
        # Each entry: (nameserver, over TCP, port, error or rcode text, response).
        failures = [f"{entry[0]} answered {entry[3]}" for entry in error.kwargs.get("errors") or ()]
        return "no nameserver gave an answer" + (f": {'; '.join(failures)}" if failures else "")
    return str(error) or type(error).__name__


async def resolve(query: DnsQuery) -> tuple[list[Endpoint], float]:
    """The endpoints ``query`` names now (sorted, each address and port once) and the seconds to wait
    before asking again; raises ``DnsError`` when DNS gives no usable answer."""
    try:
        async with asyncio.timeout(query.timeout):  # one deadline for all of it, SRV targets included
            resolver = _resolver(query)
            if query.record == "SRV":
                endpoints, ttl = await _resolve_srv(query, resolver)
            else:
                endpoints, ttl = await _resolve_addresses(query, resolver)
    except TimeoutError:
        raise DnsError(query.name, query.record, f"no answer within {query.timeout:g}s") from None
    except dns.exception.DNSException as error:
        raise DnsError(query.name, query.record, _failure(error, query)) from error
    return _merged(endpoints), float(min(max(ttl, query.min_ttl), query.max_ttl))


class DnsWatcher:
    """Follows a DNS name for as long as it runs: ``current`` is the last good set of endpoints, and
    ``on_change`` is called with each new one.

    After a good answer it asks again when the answer's (clamped) TTL has passed. After a failure it
    keeps ``current``, notes the error in ``last_error`` (logged once per run of failures) and
    retries after ``min_ttl``, then twice as long each time up to ``max_ttl``; a good answer ends the
    run. ``clock`` is a monotonic clock in seconds; ``next_at`` is on it.
    """

    def __init__(
        self,
        query: DnsQuery,
        on_change: Callable[[list[Endpoint]], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.query = query
        self.current: list[Endpoint] = []
        self.last_error: str | None = None
        self.next_at: float = clock()
        self._on_change = on_change
        self._clock = clock
        self._failures = 0
        self._retry_delay = query.min_ttl
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> float:
        """Resolve once now and take the answer in; returns the seconds until the next resolution
        (``next_at`` is then that far from now)."""
        try:
            endpoints, delay = await resolve(self.query)
        except DnsError as error:
            delay = self._failed(str(error))
        except Exception as error:  # a bug must not end discovery: keep the set and retry later
            delay = self._failed(f"{type(error).__name__}: {error}", unexpected=True)
        else:
            self._succeeded(endpoints)
        self.next_at = self._clock() + delay
        return delay

    async def run(self) -> None:
        """Resolve, wait, and again, until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(max(0.0, self.next_at - self._clock()))

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Task[None]:
        """Run on ``loop`` (the running one by default) until ``stop()``."""
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"the DNS watcher of {self.query.name} is already running")
        loop = loop or asyncio.get_running_loop()
        self._task = loop.create_task(self.run(), name=f"dns {self.query.record} {self.query.name}")
        return self._task

    async def stop(self) -> None:
        """Stop resolving; returns once the loop has ended."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def _succeeded(self, endpoints: list[Endpoint]) -> None:
        if self._failures:
            log.info(
                "DNS %s query for %s answers again: %d endpoints",
                self.query.record,
                self.query.name,
                len(endpoints),
            )
        self._failures = 0
        self._retry_delay = self.query.min_ttl
        self.last_error = None
        if endpoints == self.current:
            return
        self.current = endpoints
        try:
            self._on_change(list(endpoints))
        except Exception:
            log.exception(
                "DNS %s query for %s: applying the new endpoints failed", self.query.record, self.query.name
            )

    def _failed(self, message: str, *, unexpected: bool = False) -> float:
        """Note a failure; returns the delay before the retry (doubling per failure, up to max_ttl)."""
        self._failures += 1
        if self._failures == 1:
            log.warning(
                "%s; keeping the last %d endpoints and retrying",
                message,
                len(self.current),
                exc_info=unexpected,
            )
        self.last_error = message
        delay = self._retry_delay
        self._retry_delay = min(delay * 2, self.query.max_ttl)
        return delay
