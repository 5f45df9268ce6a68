"""The audit log over HTTPS: ``GET /auditLog`` (entries, newest first, filtered) and ``GET /auditLog/verify`` (the
chain checked by the server). Management routes: they need ServiceConfig, as certificates and CAs do (the log
tells of every part of the service, CAs included)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from opendps.audit import AuditLog, UnreadableEntry
from opendps.errors import Conflict, InvalidInput
from opendps.frontends.http.wire import int_param, run, send, services

routes = web.RouteTableDef()
DEFAULT_TOP = 100


class AuditEntryResponse(BaseModel):
    """One audit entry; ``hash`` is SHA-256 over the entry and ``previousHash`` (docs/api.md, "Audit log")."""

    sequenceNumber: int
    time: str
    action: str
    actor: str | None = None
    namespace: str | None = None
    deviceId: str | None = None
    subject: str | None = None
    details: dict[str, Any] | Any = None
    previousHash: str
    hash: str


class AuditEntryList(BaseModel):
    value: list[AuditEntryResponse]


class AuditVerification(BaseModel):
    """The chain's check: intact, or the first bad entry (``firstBadEntry``) and what is wrong (``problem``)."""

    intact: bool
    entries: int
    lastSequenceNumber: int
    lastHash: str
    message: str
    firstBadEntry: int | None = None
    problem: str | None = None


def parse_time(value: str | None, name: str) -> datetime | None:
    """An ISO 8601 instant (``Z`` or an offset; without one, UTC)."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError as exc:
        raise InvalidInput(f"{name} must be an ISO 8601 time such as 2026-12-06T10:00:00Z, not {value!r}") from exc
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:  # in UTC here: 0001-01-01T00:00+01:00 has none (the store's conversion raised OverflowError, a 500)
        return parsed.astimezone(UTC)
    except OverflowError as exc:
        raise InvalidInput(f"{name} {value!r} is out of range: in UTC it falls outside the years 1-9999") from exc


@routes.get("/auditLog")
async def list_audit_log(request: web.Request) -> web.Response:
    """Query: ``deviceId``, ``namespace``, ``action`` (a name or a family: ``certificate``), ``since`` and ``until``
    (ISO 8601; since inclusive, until exclusive), ``top`` (1-1000, default 100), ``before`` (a sequence number: the
    next page is ``before`` = the last entry's)."""
    q = request.query
    since, until = parse_time(q.get("since"), "since"), parse_time(q.get("until"), "until")
    top = int_param(request, "top", DEFAULT_TOP, 1, AuditLog.MAX_TOP)
    before = int_param(request, "before", None, 1, 2**63 - 1)
    action = q.get("action") or None
    if action is not None and not re.fullmatch(r"[a-z][a-z0-9.-]{0,63}", action):
        raise InvalidInput(f"action must be an audit action or family such as certificate.issued, not {action!r}")
    try:
        entries = await run(request, services(request).audit.list, device_id=q.get("deviceId") or None,
                            namespace=q.get("namespace") or None, action=action, since=since, until=until, top=top,
                            before=before)
    except UnreadableEntry as exc:  # a row edited by hand into something no entry is: named (409), not a 500
        raise Conflict(str(exc)) from exc
    return send(AuditEntryList(value=[AuditEntryResponse(**e.to_wire()) for e in entries]))


@routes.get("/auditLog/verify")
async def verify_audit_log(request: web.Request) -> web.Response:
    """200 either way: the answer says whether the chain is intact. ``expectHead=SEQ:HASH``: an entry an earlier check
    printed must still be there, unchanged."""
    expect = request.query.get("expectHead") or None
    head = parse_head(expect) if expect else None
    result = await run(request, services(request).audit.verify, expect_head=head)
    return send(AuditVerification(**result.to_wire()))


def parse_head(value: str) -> tuple[int, str]:
    """``SEQ:HASH`` (as ``audit verify`` prints the head) → (seq, lower-case hash)."""
    m = re.fullmatch(r"\s*(\d{1,19}):([0-9A-Fa-f]{64})\s*", value)
    if m is None or int(m.group(1)) < 1:
        raise InvalidInput(f"expectHead must be SEQUENCE:HASH (an entry's number and its 64 hex digits), not {value!r}")
    return int(m.group(1)), m.group(2).lower()
