"""Identifiers shared by the domain packages: etags (and a change under If-Match) and resource-name rules."""

from __future__ import annotations

import base64
import re
import secrets
from typing import Any

from sqlalchemy.orm import Session

from opendps.errors import InvalidInput, NotFound, OpenDPSError, PreconditionFailed
from opendps.store import lock_row
from opendps.transport import shown

_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


def new_etag() -> str:
    """Opaque version tag in Azure's style (base64 of 8 random bytes, e.g. ``AAAAAExpNs=``)."""
    return base64.b64encode(secrets.token_bytes(8)).decode()


def check_resource_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _RESOURCE_NAME.fullmatch(name):
        raise InvalidInput(
            f"{kind} name {shown(name)} is invalid: use 1-63 letters, digits and '-', starting with a letter or digit"
        )
    return name


def any_etag(if_match: str | None) -> bool:
    """No ``If-Match``, or one that any etag matches (``*``)."""
    return if_match is None or any(c.strip() in ("*", '"*"') for c in if_match.split(","))


def etag_matches(if_match: str | None, etag: str) -> bool:
    """RFC 7232 If-Match: ``*`` or the etag, quoted or not (several may be listed).

    ``"*"`` (quoted) also means any: azure-iot-hub's registry manager quotes every etag it sends, ``*`` included.
    """
    if if_match is None:
        return True
    for candidate in if_match.split(","):
        candidate = candidate.strip()
        if candidate in ("*", '"*"') or candidate.strip('"') == etag:
            return True
        # a weak validator W/"x"; checked second, since an unquoted base64 etag may itself begin with "W/"
        if candidate.startswith('W/"') and candidate[2:].strip('"') == etag:
            return True
    return False


def take_row(session: Session, row: Any, if_match: str | None, what: str, *, gone: OpenDPSError | None = None) -> None:
    """``row`` (a model with an etag, read in ``session``) for a change under ``If-Match``: 412 unless its etag
    matches; then held to the commit with a new etag (:func:`opendps.store.lock_row`) while it is still the one
    matched — 412 when another writer moved it on meanwhile, ``gone`` (404 naming ``what``) when it was deleted.
    Every read-check-write of a resource goes through here, so of two writers that read one etag, one writes."""
    if not etag_matches(if_match, row.etag):
        raise PreconditionFailed(f"ETag {if_match} does not match {what}, as per RFC7232")
    expected = None if any_etag(if_match) else row.etag
    if not lock_row(session, row, new_etag(), expected=expected):
        if expected is not None:
            raise PreconditionFailed(f"ETag {if_match} does not match {what}, as per RFC7232")
        raise gone or NotFound(f"{what} does not exist")
