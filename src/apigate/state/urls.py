"""State URLs: the accepted forms, and the startup nodes of a Redis Cluster URL.

Kept apart from the Redis backend so that the config can check a URL without loading redis-py.
Messages never quote a URL: it may hold a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

ACCEPTED_URLS = (
    "memory://, redis://[:password@]host:port/db, rediss://... (TLS), unix:///path/redis.sock, "
    "redis+cluster://[:password@]host:port[,host:port...] (Redis Cluster), rediss+cluster://... (TLS), "
    "redis+sentinel://[:password@]host:port[,host:port...]/service[/db] (Sentinel), rediss+sentinel://..."
)
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class ClusterURL:
    """What a ``redis+cluster://`` URL says: where to find the cluster, and how to log in."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool

    def describe(self) -> str:
        """The startup nodes, for messages: never the password."""
        return ",".join(f"{host}:{port}" for host, port in self.nodes) + " (cluster)"


def parse_cluster_url(url: str) -> ClusterURL:
    """Read ``redis+cluster://[[user]:password@]host:port[,host:port...][/]``; ValueError if bad."""
    scheme, username, password, hosts = _split(url, CLUSTER_SCHEMES, "Cluster")
    hosts = hosts.removesuffix("/")
    if "/" in hosts:
        raise ValueError("a Redis Cluster URL names no database: a cluster has only database 0")
    nodes = tuple(_node(part) for part in hosts.split(","))
    return ClusterURL(nodes, username, password, tls=scheme == "rediss+cluster")


@dataclass(frozen=True)
class SentinelURL:
    """What a ``redis+sentinel://`` URL says: the sentinels, the service they watch, the database,
    and how to log in to the Redis servers (the sentinels themselves take no password here)."""

    nodes: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool

    def describe(self) -> str:
        """The sentinels and the service, for messages: never the password."""
        return ",".join(f"{host}:{port}" for host, port in self.nodes) + f" (sentinel, {self.service})"

    def server_url(self, host: str, port: int) -> str:
        """A ``redis://`` URL of the server the sentinels named (the master), with the logins."""
        login = ""
        if self.password is not None:
            login = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        where = f"[{host}]" if ":" in host else host  # an IPv6 address
        return f"{'rediss' if self.tls else 'redis'}://{login}{where}:{port}/{self.db}"


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``."""
    scheme, username, password, located = _split(url, SENTINEL_SCHEMES, "Sentinel")
    hosts, _, path = located.partition("/")
    service, _, db = path.strip("/").partition("/")
    if not service:
        raise ValueError("a Redis Sentinel URL names the service its sentinels watch: .../mymaster")
    if db and not db.isdigit():
        raise ValueError(f"a Redis Sentinel URL's database is a number, not {db!r}")
    nodes = tuple(_node(part, DEFAULT_SENTINEL_PORT) for part in hosts.split(","))
    return SentinelURL(nodes, unquote(service), int(db or 0), username, password, scheme == "rediss+sentinel")


def _split(url: str, schemes: tuple[str, ...], kind: str) -> tuple[str, str | None, str | None, str]:
    """A multi-node URL's scheme, user name, password, and what follows the ``@``."""
    scheme, _, rest = url.partition("://")
    if scheme + "://" not in schemes:
        raise ValueError(f"a Redis {kind} URL starts with {' or '.join(schemes)}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"a Redis {kind} URL takes no query or fragment")
    credentials, _, located = rest.rpartition("@")
    username = password = None
    if credentials:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return scheme, username, password, located


def _node(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    if text.startswith("["):  # an IPv6 address: [::1]:7000
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError("a Redis URL lists its nodes as host:port, separated by commas")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a Redis node's port must be a number from 1 to 65535, not {port!r}")
    return host, int(port)


def check_state_url(url: str) -> str:
    """``url`` if it is a state URL this version can open; else ValueError naming the forms."""
    if url == "memory://" or url.startswith(REDIS_SCHEMES):
        return url
    if url.startswith(CLUSTER_SCHEMES):
        parse_cluster_url(url)
        return url
    if url.startswith(SENTINEL_SCHEMES):
        parse_sentinel_url(url)
        return url
    scheme = url.partition("://")[0] if "://" in url else "(none)"  # the rest may hold a password
    raise ValueError(f"unsupported state URL scheme {scheme}; accepted forms: {ACCEPTED_URLS}")
