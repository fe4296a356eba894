"""Rows: how each role's records are written to and read from the tables, for both backends.

Lists and dicts are stored as JSON text (``json`` on PostgreSQL, which keeps the text verbatim,
unlike ``jsonb``) so that both backends round-trip values the same way. Statements shared by the
backends have one ``{}`` per parameter (or take a placeholder maker), since SQLite spells a
parameter ``?`` and PostgreSQL ``$n``. Each role has its section; a new role adds its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from apigate.store.roles.consumers import ApiKey, Consumer
from apigate.store.roles.credentials import Credential
from apigate.store.roles.quotas import QuotaUsage
from apigate.store.roles.tokens import RevokedToken
from apigate.store.roles.usage import (
    DAY,
    GROUP_COLUMNS,
    HOUR,
    MINUTE,
    RollupCutoffs,
    UsageBucket,
    UsageCounts,
    UsageQuery,
    UsageRow,
)
from apigate.store.roles.webhooks import (
    DeliveryClaim,
    DeliveryOutcome,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDestinationState,
    WebhookEventDetail,
    WebhookEventQuery,
    WebhookEventSummary,
)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def select_rows(
    columns: str, table: str, column: str, value: str | None, param: str
) -> tuple[str, tuple[Any, ...]]:
    """SELECT of a table's rows whose ``column`` equals ``value`` (all rows when it is None), by id;
    ``param`` spells the parameter."""
    if value is None:
        return f"SELECT {columns} FROM {table} ORDER BY id", ()
    return f"SELECT {columns} FROM {table} WHERE {column} = {param} ORDER BY id", (value,)


# -- consumers and API keys --------------------------------------------------------------------------
CONSUMER_COLUMNS = "id, tenant, groups, metadata, disabled, created_at"
KEY_COLUMNS = (
    "id, consumer_id, hash, prefix, scopes, allowed_cidrs, time_windows, "
    "expires_at, revoked_at, created_at, rotated_from"
)


def consumer_to_row(consumer: Consumer) -> tuple[Any, ...]:
    """Values in CONSUMER_COLUMNS order."""
    return (
        consumer.id,
        consumer.tenant,
        _json(list(consumer.groups)),
        _json(consumer.metadata),
        bool(consumer.disabled),
        float(consumer.created_at),
    )


def consumer_from_row(row: Any) -> Consumer:
    return Consumer(
        id=row[0],
        tenant=row[1],
        groups=tuple(orjson.loads(row[2])),
        metadata=orjson.loads(row[3]),
        disabled=bool(row[4]),
        created_at=float(row[5]),
    )


def key_to_row(key: ApiKey) -> tuple[Any, ...]:
    """Values in KEY_COLUMNS order."""
    return (
        key.id,
        key.consumer_id,
        key.hash,
        key.prefix,
        _json(list(key.scopes)),
        _json(list(key.allowed_cidrs)),
        _json(list(key.time_windows)),
        _optional_float(key.expires_at),
        _optional_float(key.revoked_at),
        float(key.created_at),
        key.rotated_from,
    )


def key_from_row(row: Any) -> ApiKey:
    return ApiKey(
        id=row[0],
        consumer_id=row[1],
        hash=row[2],
        prefix=row[3],
        scopes=tuple(orjson.loads(row[4])),
        allowed_cidrs=tuple(orjson.loads(row[5])),
        time_windows=tuple(orjson.loads(row[6])),
        expires_at=_optional_float(row[7]),
        revoked_at=_optional_float(row[8]),
        created_at=float(row[9]),
        rotated_from=row[10],
    )


DUPLICATE_HASH_MESSAGE = "an API key with this hash already exists"


# -- credentials ------------------------------------------------------------------------------------
CREDENTIAL_COLUMNS = "id, consumer_id, kind, username, hash, scopes, created_at"
# Replacing keeps the owner: a username another consumer holds is not taken over (no row changes).
CREDENTIAL_UPSERT = (
    f"INSERT INTO credentials ({CREDENTIAL_COLUMNS}) VALUES ({{}}, {{}}, {{}}, {{}}, {{}}, {{}}, {{}}) "
    "ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, scopes = excluded.scopes, "
    "created_at = excluded.created_at "
    "WHERE credentials.consumer_id = excluded.consumer_id"
)
USERNAME_TAKEN_MESSAGE = "this username belongs to another consumer"


def credential_to_row(credential: Credential) -> tuple[Any, ...]:
    """Values in CREDENTIAL_COLUMNS order."""
    return (
        credential.id,
        credential.consumer_id,
        credential.kind,
        credential.username,
        credential.hash,
        _json(list(credential.scopes)),
        float(credential.created_at),
    )


def credential_from_row(row: Any) -> Credential:
    return Credential(
        consumer_id=row[1],
        kind=row[2],
        username=row[3],
        hash=row[4],
        scopes=tuple(orjson.loads(row[5])),
        created_at=float(row[6]),
    )


# -- revoked tokens ---------------------------------------------------------------------------------
REVOKED_TOKEN_COLUMNS = "jti, expires_at, reason, created_at"
# Revoking again replaces the end and the reason; created_at stays the first revocation's.
REVOKED_TOKEN_UPSERT = (
    f"INSERT INTO revoked_tokens ({REVOKED_TOKEN_COLUMNS}) VALUES ({{}}, {{}}, {{}}, {{}}) "
    "ON CONFLICT (jti) DO UPDATE SET expires_at = excluded.expires_at, reason = excluded.reason"
)


def revoked_token_to_row(token: RevokedToken) -> tuple[Any, ...]:
    """Values in REVOKED_TOKEN_COLUMNS order."""
    return (token.jti, _optional_float(token.expires_at), token.reason, float(token.created_at))


def revoked_token_from_row(row: Any) -> RevokedToken:
    return RevokedToken(
        jti=row[0], expires_at=_optional_float(row[1]), reason=row[2], created_at=float(row[3])
    )


# -- webhooks ----------------------------------------------------------------------------------------
# Placeholders differ (? and $n), so shared statements are built by functions given a placeholder maker.

WEBHOOK_EVENT_STATE_SQL = """CASE
    WHEN NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event = e.id) THEN 'filtered'
    WHEN EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event = e.id AND d.state = 'dead') THEN 'dead'
    WHEN EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event = e.id AND d.state = 'pending')
        THEN 'pending'
    ELSE 'delivered' END"""


def webhook_event_select(query: WebhookEventQuery, param: Callable[[int], str]) -> tuple[str, list[Any]]:
    """SELECT of (id, source, event_id, event_type, received_at, state, size) for a query, newest
    first; ``param(n)`` spells the n-th parameter (1-based)."""
    conditions: list[str] = []
    args: list[Any] = []

    def bind(value: Any) -> str:
        args.append(value)
        return param(len(args))

    for column, value in (
        ("source", query.source),
        ("event_type", query.event_type),
        ("event_id", query.event_id),
    ):
        if value is not None:
            conditions.append(f"e.{column} = {bind(value)}")
    if query.keys is not None:
        pairs = ", ".join(f"({bind(source)}, {bind(event_id)})" for source, event_id in query.keys)
        conditions.append(f"(e.source, e.event_id) IN (VALUES {pairs})" if pairs else "FALSE")
    if query.received_after is not None:
        conditions.append(f"e.received_at >= {bind(query.received_after)}")
    if query.received_before is not None:
        conditions.append(f"e.received_at < {bind(query.received_before)}")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    sql = (
        "SELECT * FROM (SELECT e.id, e.source, e.event_id, e.event_type, e.received_at, "
        f"{WEBHOOK_EVENT_STATE_SQL} AS state, length(e.body) AS size FROM webhook_events e {where}) AS x"
    )
    if query.state is not None:
        sql += f" WHERE x.state = {bind(query.state)}"
    sql += " ORDER BY x.received_at DESC, x.id DESC"
    if query.limit is not None:
        sql += f" LIMIT {bind(query.limit)}"
    return sql, args


def webhook_summary_from_row(row: Any) -> WebhookEventSummary:
    """From a row of ``webhook_event_select`` (its first column, the row id, is skipped)."""
    return WebhookEventSummary(
        source=row[1],
        event_id=row[2],
        event_type=row[3],
        received_at=float(row[4]),
        state=row[5],
        size=int(row[6]),
    )


def encode_headers(headers: tuple[tuple[str, str], ...]) -> str:
    return _json([list(pair) for pair in headers])


def decode_headers(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in orjson.loads(text))


# A batch's outcomes fold into one row per destination (see ``destination_health_rows``); the
# update keeps the newest success and starts the failure clock only at a failure after it, so a
# late outcome of an attempt that overlapped a success never makes the clock start too early.
DESTINATION_HEALTH_COLUMNS = "name, last_success_at, failing_since, last_error, last_error_at"
DESTINATION_HEALTH_UPSERT = (
    "INSERT INTO webhook_destinations (" + DESTINATION_HEALTH_COLUMNS + ") {rows} "
    "ON CONFLICT (name) DO UPDATE SET "
    "last_success_at = CASE WHEN webhook_destinations.last_success_at IS NULL "
    "OR excluded.last_success_at > webhook_destinations.last_success_at "
    "THEN excluded.last_success_at ELSE webhook_destinations.last_success_at END, "
    "failing_since = CASE WHEN excluded.last_success_at IS NOT NULL THEN excluded.failing_since "
    "WHEN webhook_destinations.failing_since IS NOT NULL THEN webhook_destinations.failing_since "
    "WHEN webhook_destinations.last_success_at IS NULL "
    "OR excluded.failing_since > webhook_destinations.last_success_at THEN excluded.failing_since "
    # The batch's first failure began before the stored success (attempts overlap): its newest then.
    "WHEN excluded.last_error_at > webhook_destinations.last_success_at THEN excluded.last_error_at END, "
    "last_error = COALESCE(excluded.last_error, webhook_destinations.last_error), "
    "last_error_at = COALESCE(excluded.last_error_at, webhook_destinations.last_error_at)"
)

# Statements with one "{}" per parameter, for the backend's placeholders.
DESTINATION_DISABLED = "SELECT 1 FROM webhook_destinations w WHERE w.name = {} AND w.disabled_at IS NOT NULL"
DISABLE_FAILING_DESTINATION = (
    "UPDATE webhook_destinations SET disabled_at = {} "
    "WHERE name = {} AND disabled_at IS NULL AND failing_since <= {}"
)
# Enabled again, a destination starts a new failure window, and its backlog is due at once, in
# the order the events arrived (equal next_at: claims then go by id).
ENABLE_DESTINATION = (
    "UPDATE webhook_destinations SET disabled_at = NULL, failing_since = NULL "
    "WHERE name = {} AND disabled_at IS NOT NULL"
)
RESUME_DESTINATION_DELIVERIES = (
    "UPDATE webhook_deliveries SET next_at = {} WHERE destination = {} AND state = 'pending'"
)

WEBHOOK_DESTINATIONS_SELECT = (
    "SELECT n.name, w.disabled_at, w.failing_since, w.last_success_at, w.last_error, w.last_error_at, "
    "COALESCE(p.pending, 0) FROM (SELECT name FROM webhook_destinations "
    "UNION SELECT destination FROM webhook_deliveries WHERE state = 'pending') AS n "
    "LEFT JOIN webhook_destinations w ON w.name = n.name "
    "LEFT JOIN (SELECT destination, count(*) AS pending FROM webhook_deliveries "
    "WHERE state = 'pending' GROUP BY destination) AS p ON p.destination = n.name "
    "ORDER BY n.name"
)


# Deliveries waiting (pending) and given up (dead), by source and destination, for metrics.
WEBHOOK_BACKLOG_SELECT = (
    "SELECT e.source, d.destination, d.state, count(*) FROM webhook_deliveries d "
    "JOIN webhook_events e ON e.id = d.event WHERE d.state IN ('pending', 'dead') "
    "GROUP BY e.source, d.destination, d.state ORDER BY e.source, d.destination, d.state"
)


def destination_health_rows(outcomes: Sequence[DeliveryOutcome]) -> list[tuple[Any, ...]]:
    """Per destination of the batch: (name, its newest success, the first failure after that
    success, the newest failure's error and time), as DESTINATION_HEALTH_COLUMNS."""
    by_name: dict[str, list[DeliveryOutcome]] = {}
    for outcome in outcomes:
        by_name.setdefault(outcome.destination, []).append(outcome)
    rows = []
    for name, batch in by_name.items():
        last_success = max((o.started_at for o in batch if o.state == "delivered"), default=None)
        failures = sorted((o for o in batch if o.state != "delivered"), key=lambda o: o.started_at)
        since = [o.started_at for o in failures if last_success is None or o.started_at > last_success]
        newest = failures[-1] if failures else None
        rows.append(
            (
                name,
                last_success,
                since[0] if since else None,
                None if newest is None else newest.error or f"status {newest.status}",
                None if newest is None else newest.started_at,
            )
        )
    return rows


def destination_state_from_row(row: Any) -> WebhookDestinationState:
    """From a row of WEBHOOK_DESTINATIONS_SELECT."""
    return WebhookDestinationState(
        name=row[0],
        disabled_at=row[1],
        failing_since=row[2],
        last_success_at=row[3],
        last_error=row[4],
        last_error_at=row[5],
        pending=int(row[6]),
    )


# A claim returns (id, attempt, schedule step, source, event_id, event_type, received_at, headers, body).
def delivery_claim_from_row(row: Any, destination: str) -> DeliveryClaim:
    return DeliveryClaim(
        delivery_id=row[0],
        destination=destination,
        attempt=row[1],
        schedule_step=row[2],
        source=row[3],
        event_id=row[4],
        event_type=row[5],
        received_at=row[6],
        headers=decode_headers(row[7]),
        body=bytes(row[8]),
    )


# An event's detail reads its deliveries and all their attempts with these, in one snapshot.
DELIVERIES_OF_EVENT = (
    "SELECT id, destination, state, attempts, next_at FROM webhook_deliveries "
    "WHERE event = {} ORDER BY destination"
)
ATTEMPTS_OF_EVENT = (
    "SELECT a.delivery, a.attempt, a.started_at, a.latency, a.status, a.error "
    "FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery "
    "WHERE d.event = {} ORDER BY a.attempt, a.id"
)


def webhook_detail_from_rows(
    summary: Any, headers: str, body: bytes, deliveries: Sequence[Any], attempts: Sequence[Any]
) -> WebhookEventDetail:
    """From a row of ``webhook_event_select``, the event's stored headers and body, and rows of
    DELIVERIES_OF_EVENT and ATTEMPTS_OF_EVENT."""
    return WebhookEventDetail(
        webhook_summary_from_row(summary),
        decode_headers(headers),
        bytes(body),
        tuple(
            WebhookDelivery(
                d[1], d[2], d[3], d[4], tuple(WebhookAttempt(*a[1:]) for a in attempts if a[0] == d[0])
            )
            for d in deliveries
        ),
    )


# -- quota usage -------------------------------------------------------------------------------------
QUOTA_USAGE_COLUMNS = "route, quota, counter_key, period, used, expires_at"
# Statements with one "{}" per parameter. Adding to a counter keeps the latest expiry and takes the
# writer's version; a reset sets it to 0 under a new version, so that gateways read the change.
QUOTA_USAGE_ADD = (
    f"INSERT INTO quota_usage ({QUOTA_USAGE_COLUMNS}, version) "
    "VALUES ({}, {}, {}, {}, {}, {}, {}) "
    "ON CONFLICT (route, quota, counter_key, period) DO UPDATE SET used = quota_usage.used + excluded.used, "
    "expires_at = excluded.expires_at, version = excluded.version"
)
QUOTA_USAGE_EXPIRED = "DELETE FROM quota_usage WHERE expires_at < {}"
QUOTA_USAGE_CHANGED = f"SELECT {QUOTA_USAGE_COLUMNS}, version FROM quota_usage WHERE version > {{}}"


def quota_usage_to_row(usage: QuotaUsage, version: int) -> tuple[Any, ...]:
    """Values for QUOTA_USAGE_ADD."""
    return (
        usage.route,
        usage.quota,
        usage.key,
        usage.period,
        int(usage.used),
        float(usage.expires_at),
        version,
    )


def quota_usage_from_row(row: Any) -> QuotaUsage:
    """From QUOTA_USAGE_COLUMNS (a version after them is ignored)."""
    return QuotaUsage(row[0], row[1], row[2], row[3], int(row[4]), float(row[5]))


def quota_changes(found: Sequence[Any], since: int) -> tuple[int, list[QuotaUsage]]:
    """Rows of QUOTA_USAGE_CHANGED as the version they bring the reader to, and their counters."""
    return max([since, *(int(row[6]) for row in found)]), [quota_usage_from_row(row) for row in found]


def quota_usage_select(
    route: str | None, key: str | None, now: float, param: Callable[[int], str]
) -> tuple[str, list[Any]]:
    """SELECT of the live counters (of one route, one key), in order."""
    args: list[Any] = [now]
    conditions = [f"expires_at >= {param(1)}"]
    for column, value in (("route", route), ("counter_key", key)):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} = {param(len(args))}")
    where = " AND ".join(conditions)
    order = "route, quota, counter_key, period"
    return f"SELECT {QUOTA_USAGE_COLUMNS} FROM quota_usage WHERE {where} ORDER BY {order}", args


def quota_usage_reset(
    route: str, quota: str, period: str, key: str | None, param: Callable[[int], str]
) -> tuple[str, list[Any]]:
    """UPDATE setting counters to 0; its first parameter is the new version."""
    args: list[Any] = [route, quota, period]
    where = f"route = {param(2)} AND quota = {param(3)} AND period = {param(4)}"
    if key is not None:
        args.append(key)
        where += f" AND counter_key = {param(5)}"
    return f"UPDATE quota_usage SET used = 0, version = {param(1)} WHERE {where}", args


# -- usage analytics --------------------------------------------------------------------------------
USAGE_KEY_COLUMNS = "granularity, bucket_start, route, consumer, key_id, tenant"
_USAGE_SUMMED = ("requests", "client_errors", "server_errors", "bytes_in", "bytes_out", "latency_sum_ms")
USAGE_COUNT_COLUMNS = ", ".join((*_USAGE_SUMMED, "latency_max_ms"))
# A whole bucket's counts from its rows: what a query and a rollup both compute.
_USAGE_SUMS = ", ".join(
    [
        *(f"CAST(sum({column}) AS BIGINT)" for column in _USAGE_SUMMED[:-1]),
        "sum(latency_sum_ms)",
        "max(latency_max_ms)",
    ]
)


def _usage_upsert(greatest: str) -> str:
    """The ON CONFLICT clause that adds to a bucket's row; ``greatest`` is the backend's two-argument
    maximum (SQLite's max, PostgreSQL's GREATEST)."""
    added = ", ".join(f"{column} = usage_buckets.{column} + excluded.{column}" for column in _USAGE_SUMMED)
    return (
        f"ON CONFLICT ({USAGE_KEY_COLUMNS}) DO UPDATE SET {added}, "
        f"latency_max_ms = {greatest}(usage_buckets.latency_max_ms, excluded.latency_max_ms)"
    )


def usage_add(greatest: str, params: Sequence[str]) -> str:
    """INSERT of one bucket's row (the values of ``usage_bucket_to_row``) that adds to an existing one."""
    return (
        f"INSERT INTO usage_buckets ({USAGE_KEY_COLUMNS}, {USAGE_COUNT_COLUMNS}) "
        f"VALUES ({', '.join(params)}) {_usage_upsert(greatest)}"
    )


def usage_bucket_to_row(bucket: UsageBucket) -> tuple[Any, ...]:
    counts = bucket.counts
    return (
        bucket.granularity,
        bucket.start,
        bucket.route or "",
        bucket.consumer or "",
        bucket.key_id or "",
        bucket.tenant or "",
        counts.requests,
        counts.client_errors,
        counts.server_errors,
        counts.bytes_in,
        counts.bytes_out,
        float(counts.latency_sum_ms),
        float(counts.latency_max_ms),
    )


def usage_rollup(greatest: str, into: int, source: str) -> str:
    """INSERT adding the rows of ``source`` (a FROM item) into buckets of ``into`` seconds."""
    return (
        f"INSERT INTO usage_buckets ({USAGE_KEY_COLUMNS}, {USAGE_COUNT_COLUMNS}) "
        f"SELECT {into}, bucket_start - bucket_start % {into}, route, consumer, key_id, tenant, "
        f"{_USAGE_SUMS} "
        f"FROM {source} GROUP BY 2, 3, 4, 5, 6 {_usage_upsert(greatest)}"
    )


def usage_rollup_moves(cutoffs: RollupCutoffs) -> list[tuple[int, int, int]]:
    """A rollup's moves, in order: (granularity of the rows, granularity they go into, rows that
    start before this go)."""
    return [(MINUTE, HOUR, cutoffs.hours_before), (HOUR, DAY, cutoffs.days_before)]


USAGE_EXPIRED = f"DELETE FROM usage_buckets WHERE granularity = {DAY} AND bucket_start < {{}}"


def usage_select(query: UsageQuery, greatest: str, param: Callable[[int], str]) -> tuple[str, list[Any]]:
    """SELECT answering ``query``: [bucket start, granularity,] grouped columns, then the counts.
    A row coarser than the asked granularity stays in its own bucket."""
    leading: list[str] = []
    if query.granularity is not None:
        step = f"{greatest}(granularity, {int(query.granularity)})"
        leading = [f"bucket_start - bucket_start % {step}", step]
    columns = [*leading, *(GROUP_COLUMNS[name] for name in query.group_by)]
    positions = ", ".join(str(n) for n in range(1, len(columns) + 1))
    grouping = f" GROUP BY {positions} ORDER BY {positions}" if columns else ""
    sql = (
        f"SELECT {', '.join([*columns, _USAGE_SUMS])} FROM usage_buckets "
        f"WHERE bucket_start >= {param(1)} AND bucket_start < {param(2)}{grouping}"
    )
    return sql, [query.start, query.end]


def usage_rows(found: Sequence[Any], query: UsageQuery) -> list[UsageRow]:
    """Rows of ``usage_select`` as UsageRows (an empty total reads as none)."""
    lead = 0 if query.granularity is None else 2
    answers = []
    for row in found:
        if row[-7] is None:  # a total over no row at all
            continue
        requests, client_errors, server_errors, bytes_in, bytes_out = (int(value) for value in row[-7:-2])
        counts = UsageCounts(
            requests, client_errors, server_errors, bytes_in, bytes_out, float(row[-2]), float(row[-1])
        )
        groups = {name: row[lead + n] or None for n, name in enumerate(query.group_by)}
        start, granularity = (int(row[0]), int(row[1])) if lead else (query.start, None)
        answers.append(UsageRow(start, granularity, groups, counts))
    return answers
