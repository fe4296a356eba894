"""Allegro's order events, polled: Allegro's REST API pushes no webhooks for orders; a merchant's
application reads the journal ``GET /order/events?from={last event id}`` instead.

- The first poll of a source starts at the newest event (``GET /order/event-stats`` gives its id),
  so only events after the gateway was set up are delivered; an empty journal starts at its
  beginning. The cursor (the id of the last committed event) lives in the store's settings.
- Requests carry the merchant's bearer token and ``Accept: application/vnd.allegro.public.v1+json``.
  The token is refreshed (``grant_type=refresh_token``, HTTP Basic ``client_id:client_secret``)
  shortly before it expires and whenever the API answers 401. Allegro answers each refresh with a
  new refresh token; it is stored at once, before the new access token is used, and every later
  refresh (in any process) starts from the stored one.
- Each event becomes a webhook event: id = Allegro's event id, type = its ``type``, body = the
  event object as JSON (``{"id", "occurredAt", "type", "order": {...}}``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import orjson

from apigate.outbound import HttpClient, OutboundError, Response, retry_after
from apigate.store.roles.settings import SettingStore
from apigate.webhooks.pollers.base import CommitPolled, PolledEvent, PollError
from apigate.webhooks.pollers.config import AllegroPollConfig

log = logging.getLogger("apigate.webhooks")

ACCEPT = b"application/vnd.allegro.public.v1+json"
REFRESH_MARGIN = 300.0  # refresh this long before the access token expires
MAX_PAGE = 16 << 20
MAX_TOKEN_ANSWER = 64 << 10
FROM_THE_BEGINNING = ""  # the stored cursor of a journal that was empty when polling began


class AllegroPoller:
    def __init__(
        self,
        source: str,
        config: AllegroPollConfig,
        store: SettingStore,
        client: HttpClient,
        commit: CommitPolled,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.config = config
        self.store = store
        self.client = client
        self.commit = commit
        self.clock = clock
        self.cursor_setting = f"webhooks.poll.{source}.cursor"
        self.token_setting = f"webhooks.poll.{source}.refresh_token"
        self._access_token: str | None = None
        self._expires_at = 0.0
        # Identifies the configured refresh token in the store without keeping a second copy of it.
        self._configured = hashlib.sha256(config.refresh_token.get_secret_value().encode()).hexdigest()

    async def poll(self) -> bool:
        cursor = await self._cursor()
        query: list[tuple[str, str | int]] = [("from", cursor)] if cursor else []
        query += [("type", event_type) for event_type in self.config.event_types or ()]
        query.append(("limit", self.config.page_size))
        page = await self._get(f"/order/events?{urlencode(query)}")
        events = _events_of(page)
        if events:
            await self.commit(self.source, [_polled(event) for event in events])
            # Only now: a crash before this line re-reads the page, and the store absorbs it.
            await self.store.set_setting(self.cursor_setting, events[-1]["id"])
        return len(events) >= self.config.page_size

    # -- the cursor ---------------------------------------------------------------------------------
    async def _cursor(self) -> str:
        stored = await self.store.get_setting(self.cursor_setting)
        if stored is not None:
            return stored
        stats = await self._get("/order/event-stats")
        latest = stats.get("latestEvent") if isinstance(stats, dict) else None
        start = latest.get("id") if isinstance(latest, dict) else None
        if start is not None and (not isinstance(start, str) or not start):
            raise PollError("GET /order/event-stats answered an unusable latestEvent.id")
        log.info("polled source %s starts after Allegro event %s", self.source, start or "(none yet)")
        # The first process to get here decides the start; any other uses what it stored.
        return await self.store.set_setting(
            self.cursor_setting, start or FROM_THE_BEGINNING, only_if_absent=True
        )

    # -- the API ------------------------------------------------------------------------------------
    async def _get(self, target: str) -> Any:
        response = await self._send_get(target, await self._token())
        if response.status == 401:
            # Revoked or expired early: one fresh token, one more try.
            self._access_token = None
            response = await self._send_get(target, await self._token())
        if response.status == 429:
            raise PollError(
                "Allegro is throttling", retry_after(response.header(b"retry-after"), time.time())
            )
        if response.status != 200:
            raise PollError(f"GET {target.partition('?')[0]} answered {response.status}")
        try:
            return orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise PollError(f"GET {target.partition('?')[0]} answered something that is not JSON") from None

    async def _send_get(self, target: str, token: str) -> Response:
        headers = [(b"accept", ACCEPT), (b"authorization", b"Bearer " + token.encode())]
        try:
            return await self.client.request(
                "GET", self.config.api_url + target, headers, timeout=self.config.timeout, max_body=MAX_PAGE
            )
        except OutboundError as exc:
            raise PollError(f"Allegro API: {exc.kind}: {exc.message}") from None

    # -- the token ----------------------------------------------------------------------------------
    async def _token(self) -> str:
        if self._access_token is None or self.clock() >= self._expires_at - REFRESH_MARGIN:
            await self._refresh()
        assert self._access_token is not None
        return self._access_token

    async def _refresh(self) -> None:
        refresh_token = await self._current_refresh_token()
        response = await self._send_refresh(refresh_token)
        if response.status in (400, 401):
            # Another process may have rotated the token since it was read: read it again.
            latest = await self._current_refresh_token()
            if latest != refresh_token:
                response = await self._send_refresh(latest)
        if response.status != 200:
            raise PollError(
                f"the token endpoint refused the refresh ({response.status}{_oauth_error(response)}); "
                "if the refresh token was revoked or expired, authorize again and set poll.refresh_token"
            )
        try:
            answer = orjson.loads(response.body)
            access_token, expires_in = answer["access_token"], float(answer["expires_in"])
            rotated = answer.get("refresh_token")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise PollError("the token endpoint answered without access_token and expires_in") from None
        if not isinstance(access_token, str) or not access_token:
            raise PollError("the token endpoint answered an unusable access_token")
        if isinstance(rotated, str) and rotated:
            # Stored before anything else: the old one may already be void.
            await self.store.set_setting(
                self.token_setting, orjson.dumps({"configured": self._configured, "token": rotated}).decode()
            )
        self._access_token = access_token
        self._expires_at = self.clock() + expires_in
        log.info("polled source %s: access token refreshed", self.source)

    async def _current_refresh_token(self) -> str:
        """The newest stored refresh token, unless the configured one changed since it was stored
        (someone authorized again): then the configured one."""
        stored = await self.store.get_setting(self.token_setting)
        if stored is not None:
            kept = orjson.loads(stored)
            if kept.get("configured") == self._configured:
                return str(kept["token"])
        return self.config.refresh_token.get_secret_value()

    async def _send_refresh(self, refresh_token: str) -> Response:
        credentials = f"{self.config.client_id}:{self.config.client_secret.get_secret_value()}"
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if self.config.redirect_uri:
            form["redirect_uri"] = self.config.redirect_uri
        headers = [
            (b"authorization", b"Basic " + base64.b64encode(credentials.encode())),
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"accept", b"application/json"),
        ]
        try:
            # Never sent twice on its own: a refresh that went through has used up its token.
            return await self.client.request(
                "POST",
                self.config.token_url,
                headers,
                urlencode(form).encode(),
                timeout=self.config.timeout,
                max_body=MAX_TOKEN_ANSWER,
            )
        except OutboundError as exc:
            raise PollError(f"token endpoint: {exc.kind}: {exc.message}") from None


def _events_of(page: Any) -> list[dict[str, Any]]:
    """The page's events, each with a string id; a page that is not so is refused whole."""
    events = page.get("events") if isinstance(page, dict) else None
    if not isinstance(events, list):
        raise PollError("GET /order/events answered without an events list")
    for event in events:
        if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not event["id"]:
            raise PollError("GET /order/events answered an event without an id")
    return events


def _polled(event: dict[str, Any]) -> PolledEvent:
    event_type = event.get("type")
    return PolledEvent(event["id"], event_type if isinstance(event_type, str) else None, orjson.dumps(event))


def _oauth_error(response: Response) -> str:
    """``: <error>`` from an OAuth error answer, for the log (never its description, which may echo input)."""
    try:
        error = orjson.loads(response.body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return f": {error}" if isinstance(error, str) and error.isascii() and len(error) < 64 else ""
