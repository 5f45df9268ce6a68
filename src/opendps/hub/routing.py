"""Telemetry routes: a hub's device-to-cloud messages also go to a streaming engine the user already runs.

In the spirit of IoT Hub message routing (``az iot hub message-route``), with NATS as the endpoint: every
telemetry message of the hub is published to ``{subject}.{hub}.{device}`` with its application and system
properties as NATS headers. A *durable* route publishes through JetStream and waits for the stream's
acknowledgement before the device's PUBACK (a stream must capture the subject: without one, or with NATS down,
the message is refused — no PUBACK, the connection closes and the device sends it again). A non-durable route
is plain NATS publish (at most once). The store stays the default sink: messages are stored first (so
``monitor-events`` keeps working), then routed.

:class:`TelemetryRoutes` owns the routes (configuration rows, cached per process); :class:`NatsRouter` is the
asyncio side that holds one NATS connection per server URL and publishes.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from opendps.errors import Conflict, InvalidInput, NotFound, PreconditionFailed, ServiceUnavailable
from opendps.hub.registry import hub_row
from opendps.ids import check_resource_name, new_etag, take_row
from opendps.store import ConfigCache, LinkedHub, Store, TelemetryRoute
from opendps.transport import nats_client
from opendps.transport.nats_client import NatsUnreachable
from opendps.transport.wire import iso8601

log = logging.getLogger(__name__)

# NATS subject tokens: no whitespace, no '.', and the wildcards '*' and '>' only as whole tokens
_SUBJECT = re.compile(r"^[A-Za-z0-9_\-$]+(\.[A-Za-z0-9_\-$]+)*$")
ROUTE_REFRESH = 2.0  # seconds a process keeps a hub's routes before asking the store again
PUBLISH_TIMEOUT = 5.0  # seconds a durable route waits for JetStream's acknowledgement (and a first connection)
RETRY_AFTER = 5.0  # seconds messages fail at once after a connection to a route's NATS could not be made
DROPS_TOLD_EVERY = 60.0  # seconds between two lines about a plain route's dropped messages (not a line per message)


@dataclass(frozen=True)
class RouteView:
    hub_id: int
    hub: str
    name: str
    kind: str
    url: str
    subject: str
    durable: bool
    enabled: bool
    etag: str
    created_at: datetime
    updated_at: datetime

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "etag": self.etag, "properties": {
            "hub": self.hub, "endpointType": self.kind, "url": self.url, "subject": self.subject,
            "durable": self.durable, "isEnabled": self.enabled, "createdAt": iso8601(self.created_at),
            "updatedAt": iso8601(self.updated_at)}}


def _view(hub: LinkedHub, r: TelemetryRoute) -> RouteView:
    return RouteView(hub.id, hub.name, r.name, r.kind, r.url, r.subject, r.durable, r.enabled, r.etag, r.created_at,
                     r.updated_at)


def check_nats_url(value: object) -> str:
    """``nats://host:port`` or ``tls://host:port`` (several servers comma-separated, as nats-py takes them)."""
    if not isinstance(value, str) or not value or len(value) > 512 or not value.isprintable():
        raise InvalidInput("url must be a NATS server URL such as nats://127.0.0.1:4222")
    for server in value.split(","):
        shown = nats_client.shown_url(server.strip())  # the answer names the server, not its password or token
        try:
            parts = urlsplit(server.strip())  # raises for an unbalanced IPv6 bracket ("nats://[::1")
        except ValueError as exc:
            raise InvalidInput(f"url {shown!r} is not a NATS server URL: {exc}") from exc
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise InvalidInput(f"url {shown!r} is not a NATS server URL (nats://host:port or tls://host:port)")
        try:
            parts.port  # noqa: B018 - raises for a port out of range
        except ValueError as exc:
            raise InvalidInput(f"url {shown!r} has an invalid port") from exc
    return value


def check_subject(value: object) -> str:
    if not isinstance(value, str) or len(value) > 200 or not _SUBJECT.fullmatch(value):
        raise InvalidInput("subject must be a NATS subject prefix of letters, digits, '-', '_' and '$' tokens "
                           "separated by '.', without wildcards (e.g. opendps.telemetry)")
    return value


def subject_token(value: str) -> str:
    """A hub name or device id as one NATS subject token: what NATS reserves is percent-encoded ('.' too)."""
    return quote(value, safe="-_$").replace(".", "%2E")


class TelemetryRoutes:
    """The routes of each hub (create, replace, list, delete), and the enabled ones a hub's telemetry takes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._enabled: ConfigCache[int, builtins.list[RouteView]] = ConfigCache(store)

    @staticmethod
    def _route(s: Session, hub_name: str, name: str) -> tuple[LinkedHub, TelemetryRoute]:
        hub = hub_row(s, hub_name)
        row = s.scalars(select(TelemetryRoute).where(TelemetryRoute.hub_id == hub.id, TelemetryRoute.name == name)).first()
        if row is None:
            raise NotFound(f"route {name!r} of hub {hub_name!r} does not exist")
        return hub, row

    def put(self, hub_name: str, name: str, body: object, *, if_match: str | None = None) -> tuple[RouteView, bool]:
        """Create or replace route ``name`` of the hub from ``{"properties": {"endpointType": "nats", "url",
        "subject", "durable", "isEnabled"}}``; returns (route, created)."""
        check_resource_name("route", name)
        props = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(props, dict):
            raise InvalidInput("request body must be an object with 'properties'")
        kind = props.get("endpointType", "nats")
        if kind != "nats":
            raise InvalidInput(f"endpointType {kind!r} is not supported; use 'nats'")
        url = check_nats_url(props.get("url"))
        subject = check_subject(props.get("subject", "opendps.telemetry"))
        durable, enabled = props.get("durable", True), props.get("isEnabled", True)
        for flag, value in (("durable", durable), ("isEnabled", enabled)):
            if not isinstance(value, bool):
                raise InvalidInput(f"{flag} must be true or false")
        now = datetime.now(UTC)
        try:
            with self.store.session() as s:
                hub = hub_row(s, hub_name)
                row = s.scalars(select(TelemetryRoute).where(TelemetryRoute.hub_id == hub.id,
                                                             TelemetryRoute.name == name)).first()
                if row is None and if_match not in (None, "*"):
                    raise PreconditionFailed(f"route {name!r} does not exist, so If-Match cannot match")
                if row is not None:
                    take_row(s, row, if_match, f"route {name!r}")
                created = row is None
                if row is None:
                    row = TelemetryRoute(hub_id=hub.id, name=name, created_at=now)
                    s.add(row)
                row.kind, row.url, row.subject, row.durable, row.enabled = kind, url, subject, durable, enabled
                row.etag, row.updated_at = new_etag(), now
                s.flush()
                return _view(hub, row), created
        except IntegrityError as exc:
            raise Conflict(f"route {name!r} of hub {hub_name!r} was created concurrently; retry") from exc

    def get(self, hub_name: str, name: str) -> RouteView:
        with self.store.session() as s:
            return _view(*self._route(s, hub_name, name))

    def list(self, hub_name: str) -> builtins.list[RouteView]:
        with self.store.session() as s:
            hub = hub_row(s, hub_name)
            rows = s.scalars(select(TelemetryRoute).where(TelemetryRoute.hub_id == hub.id).order_by(TelemetryRoute.name))
            return [_view(hub, r) for r in rows]

    def delete(self, hub_name: str, name: str, *, if_match: str | None = None) -> None:
        with self.store.session() as s:
            _, row = self._route(s, hub_name, name)
            take_row(s, row, if_match, f"route {name!r}")
            s.delete(row)

    def enabled(self, hub_id: int) -> builtins.list[RouteView]:
        """The hub's enabled routes, from the configuration cache."""
        return self._enabled.get(hub_id, lambda: self._load_enabled(hub_id))

    def _load_enabled(self, hub_id: int) -> builtins.list[RouteView]:
        with self.store.session() as s:
            rows = s.execute(select(LinkedHub, TelemetryRoute).join(TelemetryRoute, TelemetryRoute.hub_id == LinkedHub.id)
                             .where(LinkedHub.id == hub_id, TelemetryRoute.enabled.is_(True))
                             .order_by(TelemetryRoute.name)).all()
            return [_view(hub, route) for hub, route in rows]


class NatsRouter:
    """Publishes routed telemetry (asyncio): one NATS connection per server URL, made on first use and kept
    (nats-py reconnects by itself); a hub's routes are asked of the store at most every ``ROUTE_REFRESH`` s."""

    def __init__(self, routes: TelemetryRoutes, run: Any) -> None:
        self.routes = routes
        self.run = run  # runs a blocking callable in the domain's thread pool
        self._known: dict[int, tuple[float, builtins.list[RouteView]]] = {}
        self._connections: dict[str, Any] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._down: dict[str, tuple[float, str]] = {}  # url -> (until when, why): its last connect failed
        self._up: dict[str, asyncio.Event] = {}  # url -> set while its connection is up (clear while reconnecting)
        self._closing: set[asyncio.Task[None]] = set()  # connections of URLs no route uses any more, being closed
        self._drops: dict[tuple[int, str], tuple[float, int]] = {}  # (hub, route) -> (next line due, drops untold)

    async def _routes(self, hub_id: int) -> builtins.list[RouteView]:
        known = self._known.get(hub_id)
        if known is not None and time.monotonic() < known[0]:
            return known[1]
        found: builtins.list[RouteView] = await self.run(self.routes.enabled, hub_id)
        self._known[hub_id] = (time.monotonic() + ROUTE_REFRESH, found)
        if known is not None and {r.url for r in known[1]} - {r.url for r in found}:
            self._let_go()
        return found

    def _let_go(self) -> None:
        """Close the connections of URLs no route known here uses any more: a route deleted or moved to another NATS
        left its connection open for the life of the process, reconnecting every second (and saying so) to a server
        that may have been retired with it."""
        used = {r.url for _, views in self._known.values() for r in views}
        for url in [u for u in self._connections if u not in used]:
            nc = self._connections.pop(url)
            self._up.pop(url, None)
            task = asyncio.get_running_loop().create_task(nc.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        for url in [u for u in self._down if u not in used]:
            del self._down[url]

    def unrouted(self, hub_id: int) -> bool:
        """True when the hub is known, as of the last ``ROUTE_REFRESH`` s, to have no enabled route: its telemetry is
        stored and nothing else (the hub session then pipelines it). False also when that is not known now."""
        known = self._known.get(hub_id)
        return known is not None and not known[1] and time.monotonic() < known[0]

    async def _connection(self, url: str) -> Any:
        """The connection to ``url``: made on first use within ``PUBLISH_TIMEOUT``; after a failed attempt, messages
        fail at once for ``RETRY_AFTER`` s (a route to a NATS that is down must not hold its hub's telemetry)."""
        nc = self._connections.get(url)
        if nc is not None and not nc.is_closed:
            return nc
        lock = self._connecting.setdefault(url, asyncio.Lock())
        async with lock:
            nc = self._connections.get(url)
            if nc is not None and not nc.is_closed:
                return nc
            down = self._down.get(url)
            if down is not None and time.monotonic() < down[0]:
                raise NatsUnreachable(down[1])

            up = self._up.setdefault(url, asyncio.Event())
            try:
                nc = await nats_client.connect(url, name="opendps", within=PUBLISH_TIMEOUT, log=log,
                                               what="telemetry routes", on_disconnected=up.clear,
                                               on_reconnected=up.set)
            except NatsUnreachable as exc:
                # once when the attempts begin to fail, not every RETRY_AFTER s while NATS stays away
                (log.debug if url in self._down else log.warning)(
                    "telemetry routes to %s: %s; trying again every %g s meanwhile", nats_client.shown_url(url), exc,
                    RETRY_AFTER)
                self._down[url] = (time.monotonic() + RETRY_AFTER, str(exc))
                raise
            if self._down.pop(url, None) is not None:
                log.info("telemetry routes to %s: connected", nats_client.shown_url(url))
            up.set()
            self._connections[url] = nc
            return nc

    async def _connected(self, url: str, wait: bool) -> Any:
        """The connection to ``url`` while it is up. While nats-py reconnects, a publish would sit in its buffer and
        go out whenever NATS is back: a durable route's message refused to the device meanwhile would reach the
        stream anyway (then again with the device's retry), and a bus of buffered messages grows. So: with
        ``wait``, wait up to ``PUBLISH_TIMEOUT`` for the connection to come back; either way, NatsUnreachable if it
        is not back."""
        nc = await self._connection(url)
        if nc.is_connected:
            return nc
        up = self._up.setdefault(url, asyncio.Event())
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(up.wait(), PUBLISH_TIMEOUT)
        if not nc.is_connected:
            raise NatsUnreachable(f"the connection to NATS {nats_client.shown_url(url)} is down; reconnecting")
        return nc

    async def ready(self, hub_id: int) -> None:
        """Raise ServiceUnavailable while a durable route of the hub cannot take a message (its NATS unreachable):
        asked before the message is stored, so that a device's every retry during an outage is not stored again (a
        15 s outage stored 9 rows for 7 messages; a refusal after storing cannot be helped, e.g. a late ack)."""
        for route in await self._routes(hub_id):
            if route.durable:
                try:
                    await self._connected(route.url, wait=True)
                except NatsUnreachable as exc:
                    raise ServiceUnavailable(f"route {route.name!r} ({nats_client.shown_url(route.url)}) cannot take "
                                             f"messages now: {exc}") from exc

    async def deliver(self, hub_id: int, device_id: str, system: dict[str, Any], application: dict[str, Any],
                      body: bytes, position: int) -> None:
        """Send one stored message along every enabled route of its hub; raises ServiceUnavailable when a durable
        route could not get JetStream's acknowledgement (the caller then withholds the PUBACK)."""
        for route in await self._routes(hub_id):
            subject = f"{route.subject}.{subject_token(route.hub)}.{subject_token(device_id)}"
            headers = {str(k): "" if v is None else str(v) for k, v in application.items()}
            headers.update({str(k): str(v) for k, v in system.items()})
            headers.update({"iothub-connection-device-id": device_id, "iothub-hub-name": route.hub,
                            "iothub-message-source": "Telemetry", "iothub-enqueuedtime": iso8601(datetime.now(UTC)),
                            "opendps-position": str(position)})
            try:
                nc = await self._connected(route.url, wait=route.durable)
                if route.durable:
                    await _acknowledged(nc, subject, body, headers)
                else:
                    await nc.publish(subject, body, headers=headers)
            except Exception as exc:
                if route.durable:
                    raise ServiceUnavailable(f"route {route.name!r} ({nats_client.shown_url(route.url)}, {subject}) did "
                                             f"not acknowledge: "
                                             f"{type(exc).__name__}: {exc}") from exc
                if not isinstance(exc, NatsUnreachable):  # an outage is logged when it begins and ends, not per message
                    self._dropped(route, exc)

    def _dropped(self, route: RouteView, exc: Exception) -> None:
        """Tell of a plain route's dropped message: the first at once, then at most one line per ``DROPS_TOLD_EVERY``
        s with the count (a device's every message too large for the server's max_payload, or a NATS too slow to
        take them, was a line per message)."""
        key, now = (route.hub_id, route.name), time.monotonic()
        due, untold = self._drops.get(key, (0.0, 0))
        if now < due:
            self._drops[key] = (due, untold + 1)
            return
        self._drops[key] = (now + DROPS_TOLD_EVERY, 0)
        what = "a message" if not untold else f"{untold + 1} messages since its last such line (the last"
        log.info("route %r of hub %s dropped %s: %s%s; told again in %g s at most", route.name, route.hub, what, exc,
                 ")" if untold else "", DROPS_TOLD_EVERY)

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        for nc in list(self._connections.values()):
            try:
                await nc.drain()
            except Exception:  # noqa: BLE001 - closing anyway
                await nc.close()
        self._connections.clear()


class NotAcknowledged(Exception):
    """What answered a durable route's publish was not a JetStream acknowledgement of it."""


async def _acknowledged(nc: Any, subject: str, body: bytes, headers: dict[str, str]) -> None:
    """Publish through JetStream and return once a stream has acknowledged the message. Something else answering
    the subject (a core NATS responder, a server answering garbage) is no acknowledgement: nats-py took
    ``{"stream": null, "seq": null}`` for one, and named other answers only by the parse error they raised."""
    try:
        ack = await nc.jetstream().publish(subject, body, headers=headers, timeout=PUBLISH_TIMEOUT)
    except (ValueError, TypeError, AttributeError) as exc:  # json.loads, PubAck(**answer) of an answer of another shape
        raise NotAcknowledged(f"the answer to {subject} is not a JetStream acknowledgement ({exc}); is something "
                              f"other than a stream answering the subject?") from exc
    if not (isinstance(ack.stream, str) and ack.stream and isinstance(ack.seq, int) and ack.seq > 0):
        raise NotAcknowledged(f"the answer to {subject} is not a JetStream acknowledgement (stream {ack.stream!r}, "
                              f"sequence {ack.seq!r})")
