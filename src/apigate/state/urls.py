"""State URLs: the accepted forms, and the startup nodes of a Redis Cluster URL.

Kept apart from the Redis backend so that the config can check a URL without loading redis-py.
Messages never quote a URL: it may hold a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

ACCEPTED_URLS = (
    "memory://, redis://[:password@]host:port/db, rediss://... (TLS), unix:///path/redis.sock, "
    "redis+cluster://[:password@]host:port[,host:port...] (Redis Cluster), rediss+cluster://... (TLS)"
)
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
DEFAULT_PORT = 6379


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
    scheme, _, rest = url.partition("://")
    if scheme + "://" not in CLUSTER_SCHEMES:
        raise ValueError(f"a Redis Cluster URL starts with {' or '.join(CLUSTER_SCHEMES)}")
    if "?" in rest or "#" in rest:
        raise ValueError("a Redis Cluster URL takes no query or fragment")
    credentials, _, hosts = rest.rpartition("@")
    hosts = hosts.removesuffix("/")
    if "/" in hosts:
        raise ValueError("a Redis Cluster URL names no database: a cluster has only database 0")
    username = password = None
    if credentials:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(part) for part in hosts.split(","))
    return ClusterURL(nodes, username, password, tls=scheme == "rediss+cluster")


def _node(text: str) -> tuple[str, int]:
    if text.startswith("["):  # an IPv6 address: [::1]:7000
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError("a Redis Cluster URL lists its nodes as host:port, separated by commas")
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a Redis Cluster node's port must be a number from 1 to 65535, not {port!r}")
    return host, int(port)


def check_state_url(url: str) -> str:
    """``url`` if it is a state URL this version can open; else ValueError naming the forms."""
    if url == "memory://" or url.startswith(REDIS_SCHEMES):
        return url
    if url.startswith(CLUSTER_SCHEMES):
        parse_cluster_url(url)
        return url
    scheme = url.partition("://")[0] if "://" in url else "(none)"  # the rest may hold a password
    raise ValueError(f"unsupported state URL scheme {scheme}; accepted forms: {ACCEPTED_URLS}")
