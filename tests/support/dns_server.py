"""A real DNS server for the discovery tests: UDP and TCP on one free port of 127.0.0.1, each in a
thread of its own, answering from a table that the test changes while it runs. dnspython parses
the queries and builds the answers.

Names are absolute (``svc.test.``). A name with no record at all is NXDOMAIN; a name with records
of other types only answers NOERROR without records (NODATA). A CNAME is followed inside the table.
An answer too large for UDP (512 bytes, or the query's EDNS size) goes out truncated (TC), and the
client asks again over TCP, as RFC 1035 and RFC 7766 say.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Failure = Literal["SERVFAIL", "TIMEOUT", "NXDOMAIN"]
UDP_LIMIT = 512  # RFC 1035 4.2.1, for a query without EDNS


def _name(name: str) -> dns.name.Name:
    return dns.name.from_text(name)


def _read_exactly(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class _UdpHandler(socketserver.BaseRequestHandler):
    server: _UdpServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.dns.reply(data, tcp=False)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    server: _TcpServer

    def handle(self) -> None:
        # RFC 1035 4.2.2: each message is preceded by its length in two bytes.
        while (head := _read_exactly(self.request, 2)) is not None:
            data = _read_exactly(self.request, struct.unpack("!H", head)[0])
            if data is None:
                return
            reply = self.server.dns.reply(data, tcp=True)
            if reply is None:
                return  # TIMEOUT: say nothing
            self.request.sendall(struct.pack("!H", len(reply)) + reply)


class _UdpServer(socketserver.UDPServer):
    dns: DnsServer


class _TcpServer(socketserver.ThreadingTCPServer):
    dns: DnsServer
    daemon_threads = True


class DnsServer:
    """``start()`` it, point a resolver at ``nameserver``, change the table as the test goes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rrset.RRset] = {}
        self._additional: set[dns.name.Name] = set()  # SRV names answered with their targets' addresses
        self._failures: dict[dns.name.Name, Failure] = {}
        self._queries: Counter[dns.name.Name] = Counter()
        self._query_times: defaultdict[dns.name.Name, list[float]] = defaultdict(list)
        self.tcp_queries = 0
        self.port = 0
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def nameserver(self) -> tuple[str, int]:
        """The (address, port) pair to ask, as ``DnsQuery.nameservers`` takes it."""
        return ("127.0.0.1", self.port)

    def start(self) -> DnsServer:
        # UDP takes a free port, TCP the same one; in the rare case that TCP port is taken, try again.
        for _ in range(20):
            udp = _UdpServer(("127.0.0.1", 0), _UdpHandler)
            try:
                tcp = _TcpServer(("127.0.0.1", udp.server_address[1]), _TcpHandler)
            except OSError:
                udp.server_close()
                continue
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        udp.dns = tcp.dns = self
        self.port = udp.server_address[1]
        self._servers = [udp, tcp]
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

    def set(self, name: str, rdtype: str, values: Iterable[str], ttl: int = 60) -> None:
        """The records of one type (A, AAAA, CNAME, ...) at ``name``, as text; no values removes them."""
        self._put(_name(name), dns.rdatatype.from_text(rdtype), list(values), ttl)

    def set_srv(
        self,
        name: str,
        records: Iterable[tuple[int, int, int, str]],
        ttl: int = 60,
        additional: bool = False,
    ) -> None:
        """SRV records (priority, weight, port, target) at ``name``; with ``additional`` an answer
        carries the targets' A and AAAA records from the table in its additional section."""
        owner = _name(name)
        values = [f"{priority} {weight} {port} {target}" for priority, weight, port, target in records]
        with self._lock:
            (self._additional.add if additional else self._additional.discard)(owner)
        self._put(owner, dns.rdatatype.SRV, values, ttl)

    def fail(self, name: str, failure: Failure | None) -> None:
        """Answer ``name`` with SERVFAIL, NXDOMAIN or nothing at all (TIMEOUT); None answers again."""
        with self._lock:
            if failure is None:
                self._failures.pop(_name(name), None)
            else:
                self._failures[_name(name)] = failure

    def queries(self, name: str) -> int:
        """How many queries (any type, UDP or TCP) asked about ``name``."""
        with self._lock:
            return self._queries[_name(name)]

    def query_times(self, name: str) -> list[float]:
        """When each query about ``name`` arrived, on time.monotonic()."""
        with self._lock:
            return list(self._query_times[_name(name)])

    def _put(
        self, owner: dns.name.Name, rdtype: dns.rdatatype.RdataType, values: list[str], ttl: int
    ) -> None:
        rrset = dns.rrset.from_text_list(owner, ttl, dns.rdataclass.IN, rdtype, values) if values else None
        with self._lock:
            if rrset is None:
                self._records.pop((owner, rdtype), None)
            else:
                self._records[(owner, rdtype)] = rrset

    def reply(self, wire: bytes, tcp: bool) -> bytes | None:
        """The answer to one query as bytes, or None to stay silent."""
        query = dns.message.from_wire(wire)
        question = query.question[0]
        with self._lock:
            self._queries[question.name] += 1
            self._query_times[question.name].append(time.monotonic())
            self.tcp_queries += tcp
            failure = self._failures.get(question.name)
            if failure == "TIMEOUT":
                return None
            response = self._answer(query, question.name, question.rdtype, failure)
        limit = 65535 if tcp else max(UDP_LIMIT, query.payload if query.edns >= 0 else 0)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC
            return truncated.to_wire()

    def _answer(
        self,
        query: dns.message.Message,
        name: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        failure: Failure | None,
    ) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if failure == "SERVFAIL":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if failure == "NXDOMAIN" or not any(owner == name for owner, _ in self._records):
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        # Follow CNAMEs inside the table, as an authoritative server does for its own zone.
        while rdtype != dns.rdatatype.CNAME and (name, dns.rdatatype.CNAME) in self._records:
            alias = self._records[(name, dns.rdatatype.CNAME)]
            response.answer.append(alias)
            name = alias[0].target
        rrset = self._records.get((name, rdtype))
        if rrset is None:
            return response  # NODATA
        response.answer.append(rrset)
        if rdtype == dns.rdatatype.SRV and name in self._additional:
            for target in dict.fromkeys(record.target for record in rrset):
                for family in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    if (target, family) in self._records:
                        response.additional.append(self._records[(target, family)])
        return response
