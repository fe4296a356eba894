"""The allow-list that keeps registered services from pointing the gateway at internal hosts.

A service that registers itself chooses where the gateway connects, so an address is accepted only
when ``discovery.allowed_networks`` lists a network holding it (server-side request forgery: the
cloud metadata service at 169.254.169.254, the gateway's own loopback, the Redis next to it).
Listing a broad public range (``0.0.0.0/0``, ``::/0``) admits public addresses only: an address
that is not globally reachable (private, loopback, link-local, CGNAT, multicast, reserved...) needs
a listed network that is itself not global, such as ``10.0.0.0/8`` or ``169.254.169.254/32``.

An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) reaches the IPv4 host it carries, so it is judged
as that address. An address of the NAT64 prefix (RFC 6052, ``64:ff9b::/96``) or of 6to4 (RFC 3056,
``2002::/16``) may be translated to the IPv4 address it embeds, so both must be admitted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from typing import Final

from apigate.httpspec import peer_address

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVE_TIMEOUT: Final = 5.0

# Not globally reachable, though Python's is_global says so for multicast, IPv6 site-local and the
# local-use NAT64 prefix (RFC 8215).
_ALSO_NOT_GLOBAL: Final[tuple[IPNetwork, ...]] = tuple(
    ipaddress.ip_network(text) for text in ("224.0.0.0/4", "ff00::/8", "fec0::/10", "64:ff9b:1::/48")
)
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")


class RegistrationError(ValueError):
    """A registration refused: ``field`` names what the client sent wrong (``port``, ``host``...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class AddressRefused(RegistrationError):
    """The address is outside ``discovery.allowed_networks``."""


def _is_global(address: IPAddress) -> bool:
    return address.is_global and not any(address in network for network in _ALSO_NOT_GLOBAL)


def _network_is_global(network: IPNetwork) -> bool:
    """False only when every address of ``network`` is not global: ``0.0.0.0/0`` is global."""
    return network.is_global and not any(
        network.version == block.version and network.subnet_of(block)  # type: ignore[arg-type]
        for block in _ALSO_NOT_GLOBAL
    )


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address that NAT64 or 6to4 would translate ``address`` to, if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def _admitted(address: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    if _is_global(address):
        return any(address in network for network in allowed)
    return any(address in network and not _network_is_global(network) for network in allowed)


def address_allowed(ip: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    """Whether the gateway may connect to ``ip``: a listed network holds it, and a non-global
    address needs a listed network that is itself not global."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    embedded = _embedded_ipv4(ip)
    if embedded is not None and not _admitted(embedded, allowed):
        return False
    return _admitted(ip, allowed)


def _refusal(field: str, host: str, address: IPAddress) -> RegistrationError:
    named = host if host == str(address) else f"{host} ({address})"
    message = f"{named} is not allowed: discovery.allowed_networks does not list it"
    if not _is_global(address):
        message += (
            " (an internal address needs its internal network listed, such as 10.0.0.0/8; "
            "a public range such as 0.0.0.0/0 does not admit it)"
        )
    return AddressRefused(field, message)


async def resolve_allowed(
    host: str,
    allowed: Sequence[IPNetwork],
    loop: asyncio.AbstractEventLoop,
    field: str = "host",
    timeout: float = RESOLVE_TIMEOUT,
) -> str:
    """The address to connect to for ``host``: an IP literal is checked as it is; a name is resolved
    once, and every address it has must be allowed (a name with one internal address among public
    ones is refused: a client could be sent to any of them). Raises ``RegistrationError(field, ...)``."""
    try:
        addresses = [peer_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)]
    except ValueError:
        addresses = await _resolve(host, loop, field, timeout)
    for address in addresses:
        if not address_allowed(address, allowed):
            raise _refusal(field, host, address)
    return str(addresses[0])


async def _resolve(host: str, loop: asyncio.AbstractEventLoop, field: str, timeout: float) -> list[IPAddress]:
    try:
        # getaddrinfo runs in the loop's executor: the loop never blocks on a slow resolver.
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout)
    except (OSError, UnicodeError) as exc:
        raise RegistrationError(field, f"{host} does not resolve ({exc})") from None
    except TimeoutError:
        raise RegistrationError(field, f"{host} did not resolve within {timeout:g}s") from None
    addresses: list[IPAddress] = []
    for info in infos:
        address = peer_address(str(info[4][0]))
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise RegistrationError(field, f"{host} has no address")
    return addresses
