"""DNS service discovery against a real DNS server (tests/support/dns_server.py): A, AAAA and SRV
answers become endpoints, TTLs set the schedule within [min_ttl, max_ttl], and failures keep the last
good set."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import pytest

from apigate.discovery.dns import DnsError, DnsQuery, DnsWatcher, Endpoint, resolve
from tests.support.dns_server import DnsServer
from tests.support.state import Run, until

# A sleep may end a hair before its time on the clock the DNS server reads.
EARLY = 0.01


def query(server: DnsServer, name: str = "svc.test.", record: Any = "A", **fields: Any) -> DnsQuery:
    fields.setdefault("port", None if record == "SRV" else 8080)
    return DnsQuery(name, record, nameservers=(server.nameserver,), **fields)


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


class Changes:
    """An on_change that records each set it is given (and can be told to fail)."""

    def __init__(self, fail: bool = False) -> None:
        self.sets: list[list[Endpoint]] = []
        self.fail = fail

    def __call__(self, endpoints: list[Endpoint]) -> None:
        self.sets.append(endpoints)
        if self.fail:
            raise RuntimeError("the upstream refused the new set")


# --- resolve(): A and AAAA ---------------------------------------------------------------------------


def test_a_records_become_sorted_endpoints_with_the_query_port(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.10", "127.0.0.2", "127.0.0.1"], ttl=30)

    # A name without a final dot is asked as it is (no search domains with given nameservers).
    endpoints, ttl = run(resolve(query(dns_server, "svc.test")))

    assert endpoints == [
        Endpoint("127.0.0.1", 8080),
        Endpoint("127.0.0.2", 8080),
        Endpoint("127.0.0.10", 8080),
    ]
    assert ttl == 30.0


def test_aaaa_records_become_endpoints(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "AAAA", ["2001:db8::2", "2001:db8::1"], ttl=20)

    endpoints, ttl = run(resolve(query(dns_server, record="AAAA", port=443)))

    assert endpoints == [Endpoint("2001:db8::1", 443), Endpoint("2001:db8::2", 443)]
    assert ttl == 20.0


def test_a_plus_aaaa_asks_both_and_waits_for_the_sooner_ttl(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"], ttl=30)
    dns_server.set("svc.test.", "AAAA", ["::1"], ttl=12)

    endpoints, ttl = run(resolve(query(dns_server, record="A+AAAA")))

    assert endpoints == [Endpoint("127.0.0.1", 8080), Endpoint("::1", 8080)]
    assert ttl == 12.0
    assert dns_server.queries("svc.test.") == 2


def test_a_plus_aaaa_takes_one_family_when_the_other_has_no_records(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "AAAA", ["::1"], ttl=12)

    assert run(resolve(query(dns_server, record="A+AAAA"))) == ([Endpoint("::1", 8080)], 12.0)


def test_a_name_without_records_of_the_type_is_an_error(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "AAAA", ["::1"])

    with pytest.raises(DnsError, match=r"DNS A query for svc\.test\.: the name has no A records"):
        run(resolve(query(dns_server)))


def test_a_cname_on_the_way_counts_towards_the_ttl(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("alias.test.", "CNAME", ["svc.test."], ttl=5)
    dns_server.set("svc.test.", "A", ["127.0.0.1"], ttl=60)

    assert run(resolve(query(dns_server, "alias.test."))) == ([Endpoint("127.0.0.1", 8080)], 5.0)


def test_an_answer_too_large_for_udp_is_asked_again_over_tcp(dns_server: DnsServer, run: Run) -> None:
    addresses = [f"10.0.{index // 200}.{index % 200 + 1}" for index in range(100)]  # far above 512 bytes
    dns_server.set("big.test.", "A", addresses)

    endpoints, _ = run(resolve(query(dns_server, "big.test.")))

    assert {endpoint.host for endpoint in endpoints} == set(addresses)
    assert dns_server.tcp_queries == 1


# --- resolve(): the TTL held within [min_ttl, max_ttl] -----------------------------------------------


def test_a_ttl_of_zero_is_raised_to_min_ttl(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"], ttl=0)

    assert run(resolve(query(dns_server, min_ttl=2.5)))[1] == 2.5


def test_a_long_ttl_is_cut_to_max_ttl(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"], ttl=86400)

    assert run(resolve(query(dns_server, max_ttl=45)))[1] == 45.0


# --- resolve(): SRV (RFC 2782) -----------------------------------------------------------------------


def test_srv_uses_the_lowest_priority_with_each_record_port_and_weight(
    dns_server: DnsServer, run: Run
) -> None:
    dns_server.set("t1.svc.test.", "A", ["10.0.0.1"])
    dns_server.set("t2.svc.test.", "A", ["10.0.0.2"])
    dns_server.set("t2.svc.test.", "AAAA", ["2001:db8::2"])
    dns_server.set("backup.svc.test.", "A", ["10.0.0.9"])
    dns_server.set_srv(
        "_http._tcp.svc.test.",
        [
            (20, 100, 9000, "backup.svc.test."),
            (10, 60, 8001, "t1.svc.test."),
            (10, 40, 8002, "t2.svc.test."),
        ],
    )

    endpoints, _ = run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV")))

    assert endpoints == [
        Endpoint("10.0.0.1", 8001, 60),
        Endpoint("10.0.0.2", 8002, 40),
        Endpoint("2001:db8::2", 8002, 40),
    ]
    assert dns_server.queries("backup.svc.test.") == 0  # a lower priority is not even looked up


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ((0, 0), (1, 1)),  # weight 0 everywhere: no preference, so they share evenly
        ((0, 7), (0, 7)),  # among weighted records a 0 stays 0
    ],
    ids=["all-zero-share-evenly", "zero-among-weighted-stays-zero"],
)
def test_srv_weights_of_zero(
    dns_server: DnsServer, run: Run, weights: tuple[int, int], expected: tuple[int, int]
) -> None:
    dns_server.set("t1.svc.test.", "A", ["10.0.0.1"])
    dns_server.set("t2.svc.test.", "A", ["10.0.0.2"])
    dns_server.set_srv(
        "_http._tcp.svc.test.", [(0, weights[0], 8001, "t1.svc.test."), (0, weights[1], 8002, "t2.svc.test.")]
    )

    endpoints, _ = run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV")))

    assert endpoints == [Endpoint("10.0.0.1", 8001, expected[0]), Endpoint("10.0.0.2", 8002, expected[1])]


def test_srv_records_naming_one_address_and_port_add_up_their_weights(
    dns_server: DnsServer, run: Run
) -> None:
    dns_server.set("t1.svc.test.", "A", ["10.0.0.1"])
    dns_server.set("same.svc.test.", "A", ["10.0.0.1"])
    dns_server.set_srv("_http._tcp.svc.test.", [(0, 3, 8001, "t1.svc.test."), (0, 4, 8001, "same.svc.test.")])

    endpoints, _ = run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV")))

    assert endpoints == [Endpoint("10.0.0.1", 8001, 7)]


def test_srv_targets_sent_along_are_not_asked_for(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("t1.svc.test.", "A", ["10.0.0.1"], ttl=50)
    dns_server.set("t1.svc.test.", "AAAA", ["2001:db8::1"], ttl=40)
    dns_server.set_srv("_http._tcp.svc.test.", [(0, 1, 8001, "t1.svc.test.")], ttl=60, additional=True)

    endpoints, ttl = run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV")))

    assert endpoints == [Endpoint("10.0.0.1", 8001), Endpoint("2001:db8::1", 8001)]
    assert ttl == 40.0
    assert dns_server.queries("t1.svc.test.") == 0


def test_srv_targets_not_sent_along_are_asked_for_both_families(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("t1.svc.test.", "A", ["10.0.0.1"], ttl=50)
    dns_server.set_srv("_http._tcp.svc.test.", [(0, 1, 8001, "t1.svc.test.")], ttl=60)

    endpoints, ttl = run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV")))

    assert endpoints == [Endpoint("10.0.0.1", 8001)]
    assert ttl == 50.0
    assert dns_server.queries("t1.svc.test.") == 2  # A and AAAA


def test_srv_target_dot_means_no_service_and_is_an_answer(dns_server: DnsServer, run: Run) -> None:
    dns_server.set_srv("_http._tcp.svc.test.", [(0, 0, 0, ".")], ttl=30)

    assert run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV"))) == ([], 30.0)


def test_srv_target_that_does_not_exist_is_left_out(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("t1.svc.test.", "A", ["10.0.0.1"])
    dns_server.set_srv("_http._tcp.svc.test.", [(0, 5, 8001, "t1.svc.test."), (0, 0, 8002, "gone.svc.test.")])

    endpoints, _ = run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV")))

    assert endpoints == [Endpoint("10.0.0.1", 8001, 5)]


def test_srv_without_any_target_address_is_an_error(dns_server: DnsServer, run: Run) -> None:
    dns_server.set_srv("_http._tcp.svc.test.", [(0, 5, 8001, "gone.svc.test.")])

    with pytest.raises(DnsError, match=r"no SRV target has an address \(gone\.svc\.test\.\)"):
        run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV")))


def test_srv_target_that_fails_fails_the_resolution(dns_server: DnsServer, run: Run) -> None:
    # A target's SERVFAIL says nothing about the target: dropping it would shrink the set for nothing.
    dns_server.set("t1.svc.test.", "A", ["10.0.0.1"])
    dns_server.set("t2.svc.test.", "A", ["10.0.0.2"])
    dns_server.set_srv("_http._tcp.svc.test.", [(0, 1, 8001, "t1.svc.test."), (0, 1, 8002, "t2.svc.test.")])
    dns_server.fail("t2.svc.test.", "SERVFAIL")

    with pytest.raises(DnsError, match="SERVFAIL"):
        run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV")))


# --- resolve(): failures -----------------------------------------------------------------------------


def test_nxdomain_is_an_error_naming_the_name_and_type(dns_server: DnsServer, run: Run) -> None:
    with pytest.raises(DnsError, match=r"DNS A\+AAAA query for nowhere\.test\.: no such name \(NXDOMAIN\)"):
        run(resolve(query(dns_server, "nowhere.test.", "A+AAAA")))


def test_nxdomain_for_a_name_that_had_records_is_an_error(dns_server: DnsServer, run: Run) -> None:
    dns_server.set_srv("_http._tcp.svc.test.", [(0, 1, 8001, "t1.svc.test.")])
    dns_server.fail("_http._tcp.svc.test.", "NXDOMAIN")

    with pytest.raises(DnsError, match=r"DNS SRV query for _http\._tcp\.svc\.test\.: no such name"):
        run(resolve(query(dns_server, "_http._tcp.svc.test.", "SRV")))


def test_servfail_is_an_error(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"])
    dns_server.fail("svc.test.", "SERVFAIL")

    with pytest.raises(
        DnsError, match=r"DNS A query for svc\.test\.: no nameserver gave an answer: .*SERVFAIL"
    ):
        run(resolve(query(dns_server)))


def test_a_server_that_does_not_answer_fails_within_the_timeout(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"])
    dns_server.fail("svc.test.", "TIMEOUT")
    started = time.monotonic()

    with pytest.raises(DnsError, match=r"DNS A query for svc\.test\.: no answer within 0\.6s"):
        run(resolve(query(dns_server, timeout=0.6)))

    assert 0.6 - EARLY <= time.monotonic() - started < 1.5
    assert dns_server.queries("svc.test.") == 2  # a lost datagram is asked again once within the timeout


# --- DnsQuery: bad fields ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name: must be a DNS name"),
        ({"name": "."}, "name: must be a DNS name"),
        ({"name": 42}, "name: must be a DNS name"),
        ({"name": "svc test"}, "name: must be a DNS name without spaces"),
        ({"name": "a..b"}, "name: is not a valid DNS name"),
        ({"name": "x" * 64 + ".test"}, "name: is not a valid DNS name"),
        ({"name": "10.0.0.1"}, "name: is an IP address"),
        ({"record": "MX"}, r"record: must be one of A, AAAA, A\+AAAA, SRV"),
        ({"port": None}, "port: required with record A"),
        ({"port": 0}, "port: must be an integer from 1 to 65535"),
        ({"port": 65536}, "port: must be an integer from 1 to 65535"),
        ({"port": "80"}, "port: must be an integer"),
        ({"port": True}, "port: must be an integer"),
        ({"record": "SRV", "port": 70000}, "port: must be an integer"),
        ({"nameservers": "127.0.0.1"}, r"nameservers: must be a list of \(IP address, port\) pairs"),
        (
            {"nameservers": [("127.0.0.1", 53), "127.0.0.1"]},
            r"nameservers\[1\]: must be an \(IP address, port\)",
        ),
        ({"nameservers": [("dns.test", 53)]}, r"nameservers\[0\]: the host must be an IP address"),
        ({"nameservers": [("127.0.0.1", 0)]}, r"nameservers\[0\]: the port must be an integer"),
        ({"min_ttl": 0}, "min_ttl: must be a number of seconds above 0"),
        ({"min_ttl": -1}, "min_ttl: must be a number"),
        ({"min_ttl": float("nan")}, "min_ttl: must be a number"),
        ({"min_ttl": "1s"}, "min_ttl: must be a number"),
        ({"max_ttl": float("inf")}, "max_ttl: must be a number of seconds, at least min_ttl"),
        ({"min_ttl": 10, "max_ttl": 5}, "max_ttl: must be a number of seconds, at least min_ttl"),
        ({"timeout": 0}, "timeout: must be a number of seconds above 0"),
        ({"timeout": None}, "timeout: must be a number"),
    ],
)
def test_bad_query_fields_are_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    given: dict[str, Any] = {"name": "svc.test.", "record": "A", "port": 80, **fields}

    with pytest.raises(ValueError, match=f"^{message}"):
        DnsQuery(**given)


def test_a_good_query_is_hashable_with_its_nameservers_as_tuples() -> None:
    given = DnsQuery("_http._tcp.svc.test.", "SRV", nameservers=[["127.0.0.1", 5353]])  # type: ignore[arg-type]

    assert given.nameservers == (("127.0.0.1", 5353),)
    assert hash(given) == hash(DnsQuery("_http._tcp.svc.test.", "SRV", nameservers=(("127.0.0.1", 5353),)))


# --- DnsWatcher --------------------------------------------------------------------------------------


def test_watcher_follows_a_change_once_the_ttl_has_passed_and_not_before(
    dns_server: DnsServer, run: Run
) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"], ttl=1)
    changes = Changes()
    watcher = DnsWatcher(query(dns_server, min_ttl=0.1), changes)

    async def scenario() -> None:
        watcher.start()
        try:
            await until(lambda: len(changes.sets) == 1)
            dns_server.set("svc.test.", "A", ["127.0.0.1", "127.0.0.2"], ttl=1)
            await until(lambda: len(changes.sets) == 2)
        finally:
            await watcher.stop()

    run(scenario())

    assert changes.sets == [
        [Endpoint("127.0.0.1", 8080)],
        [Endpoint("127.0.0.1", 8080), Endpoint("127.0.0.2", 8080)],
    ]
    assert watcher.current == changes.sets[-1]
    first, second = dns_server.query_times("svc.test.")[:2]
    assert 1.0 - EARLY <= second - first < 2.0


@pytest.mark.parametrize(
    ("ttl", "expected_gap"),
    [(0, 0.2), (86400, 0.3)],
    ids=["ttl-zero-held-at-min_ttl", "long-ttl-cut-to-max_ttl"],
)
def test_watcher_asks_again_after_the_clamped_ttl(
    dns_server: DnsServer, run: Run, ttl: int, expected_gap: float
) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"], ttl=ttl)
    watcher = DnsWatcher(query(dns_server, min_ttl=0.2, max_ttl=0.3), Changes())

    async def scenario() -> None:
        watcher.start()
        try:
            await until(lambda: dns_server.queries("svc.test.") >= 4)
        finally:
            await watcher.stop()

    run(scenario())

    # Never sooner (a TTL of 0 must not hammer the server), and not much later.
    assert all(
        expected_gap - EARLY <= gap < expected_gap + 1.0 for gap in gaps(dns_server.query_times("svc.test."))
    )


def test_watcher_keeps_the_last_good_set_through_failures_and_recovers(
    dns_server: DnsServer, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"], ttl=0)
    changes = Changes()
    watcher = DnsWatcher(query(dns_server, min_ttl=0.05, max_ttl=0.2), changes)

    async def scenario() -> None:
        watcher.start()
        try:
            await until(lambda: len(changes.sets) == 1)
            asked = dns_server.queries("svc.test.")
            dns_server.fail("svc.test.", "SERVFAIL")
            await until(lambda: dns_server.queries("svc.test.") >= asked + 3)  # three failures in a row
            assert watcher.current == [Endpoint("127.0.0.1", 8080)]
            assert watcher.last_error is not None and "SERVFAIL" in watcher.last_error
            dns_server.set("svc.test.", "A", ["127.0.0.2"], ttl=0)
            dns_server.fail("svc.test.", None)
            await until(lambda: len(changes.sets) == 2)
        finally:
            await watcher.stop()

    with caplog.at_level(logging.INFO, logger="apigate"):
        run(scenario())

    assert changes.sets == [[Endpoint("127.0.0.1", 8080)], [Endpoint("127.0.0.2", 8080)]]
    assert watcher.last_error is None
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per run of failures
    assert "DNS A query for svc.test.: no nameserver gave an answer" in warnings[0]
    assert "keeping the last 1 endpoints" in warnings[0]
    assert any("answers again" in record.getMessage() for record in caplog.records)


def test_watcher_retries_after_min_ttl_doubling_up_to_max_ttl(dns_server: DnsServer, run: Run) -> None:
    now = [1000.0]
    dns_server.set("svc.test.", "A", ["127.0.0.1"], ttl=3)
    dns_server.fail("svc.test.", "SERVFAIL")
    changes = Changes()
    watcher = DnsWatcher(query(dns_server, min_ttl=1, max_ttl=5), changes, clock=lambda: now[0])

    def refresh() -> float:
        delay = run(watcher.refresh())
        assert watcher.next_at == now[0] + delay
        now[0] = watcher.next_at
        return delay

    assert [refresh() for _ in range(5)] == [1, 2, 4, 5, 5]
    assert watcher.current == [] and changes.sets == []  # nothing good yet: nothing to hand on

    dns_server.fail("svc.test.", None)
    assert refresh() == 3.0
    assert watcher.last_error is None and changes.sets == [[Endpoint("127.0.0.1", 8080)]]

    dns_server.fail("svc.test.", "NXDOMAIN")
    assert [refresh() for _ in range(2)] == [1, 2]  # a new run of failures starts again at min_ttl
    assert watcher.current == [Endpoint("127.0.0.1", 8080)]
    assert "no such name" in (watcher.last_error or "")
    assert dns_server.queries("svc.test.") == 5 + 1 + 2  # one query per resolution, none between


def test_watcher_outlives_an_on_change_that_fails(
    dns_server: DnsServer, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"], ttl=0)
    changes = Changes(fail=True)
    watcher = DnsWatcher(query(dns_server, min_ttl=0.05), changes)

    async def scenario() -> None:
        task = watcher.start()
        try:
            await until(lambda: len(changes.sets) == 1)
            dns_server.set("svc.test.", "A", ["127.0.0.2"], ttl=0)
            await until(lambda: len(changes.sets) == 2)
            assert not task.done()
        finally:
            await watcher.stop()
        assert task.cancelled()

    with caplog.at_level(logging.ERROR, logger="apigate"):
        run(scenario())

    assert changes.sets[-1] == [Endpoint("127.0.0.2", 8080)] == watcher.current
    failures = [
        record for record in caplog.records if "applying the new endpoints failed" in record.getMessage()
    ]
    assert len(failures) == 2 and failures[0].exc_info is not None


def test_watcher_refuses_a_second_start(dns_server: DnsServer, run: Run) -> None:
    dns_server.set("svc.test.", "A", ["127.0.0.1"])
    watcher = DnsWatcher(query(dns_server), Changes())

    async def scenario() -> None:
        watcher.start()
        try:
            with pytest.raises(RuntimeError, match="already running"):
                watcher.start()
        finally:
            await watcher.stop()
        await watcher.stop()  # stopping twice is harmless

    run(scenario())
