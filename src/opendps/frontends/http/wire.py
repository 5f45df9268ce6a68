"""Request and response plumbing shared by the HTTP route modules: the runtime, bodies, responses, paging.

Every response body goes through :func:`send` (a pydantic wire model or plain JSON-able data); every domain
call through :func:`run` (the domain thread pool).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

from aiohttp import web
from pydantic import BaseModel, ValidationError

from opendps.errors import InvalidInput
from opendps.frontends.runtime import Runtime
from opendps.services import Services
from opendps.transport.wire import decimal, parse_json

RUNTIME = web.AppKey("runtime", Runtime)
TOKEN_HUB = web.RequestKey("sas_hub", str)  # the hub a verified iothubowner token is bound to (absent: any)
MAX_PAGE = 1000
MAX_OFFSET = 2**31 - 1  # the largest x-ms-continuation: past any page given, and an integer every database binds
P = ParamSpec("P")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


def services(request: web.Request) -> Services:
    return request.app[RUNTIME].services


async def run(request: web.Request, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run blocking domain code in the app's thread pool (never on the event loop)."""
    return await request.app[RUNTIME].domain.run(fn, *args, **kwargs)


@overload
async def json_body(request: web.Request) -> Any: ...
@overload
async def json_body(request: web.Request, model: type[M], *, required: bool = True) -> M: ...
async def json_body(request: web.Request, model: type[M] | None = None, *, required: bool = True) -> Any:
    """The JSON request body, validated by ``model`` when given (absent and not ``required``: ``model()``)."""
    raw = await request.read()
    if not raw.strip():
        if required or model is None:
            raise InvalidInput(f"request body is required{f' ({model.__name__})' if model else ''}")
        return model()
    data = parse_json(raw, "request body")
    if model is None:
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"invalid request body: {where}: {first['msg']}") from exc


async def json_object_body(request: web.Request, what: str = "request body", *, required: bool = True) -> dict[str, Any]:
    """A JSON object body (absent and not ``required``: ``{}``)."""
    if not required and not (await request.read()).strip():
        return {}
    data = await json_body(request)
    if not isinstance(data, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return data


def object_member(parent: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """Member ``name`` of a JSON object that must itself be an object (absent or null: ``{}``): anything else is a 400
    naming ``where``, not an AttributeError (a 500) when the route reads into it."""
    value = parent.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    return value


def send(data: BaseModel | Any, status: int = 200, etag: str | None = None,
         headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response: a pydantic wire model (``None`` fields left out) or JSON-able data; ``etag`` quoted."""
    h = dict(headers or {})
    if etag:
        h["ETag"] = f'"{etag}"'
    text = data.model_dump_json(exclude_none=True) if isinstance(data, BaseModel) else json.dumps(data)
    return web.Response(status=status, text=text, content_type="application/json", headers=h)


def page(request: web.Request, items: list[Any], item_type: str) -> web.Response:
    """Azure's query paging: x-ms-max-item-count in, x-ms-continuation in and out."""
    start, size = page_window(request)
    return page_response(items[start:start + size], item_type, start, size, more=start + size < len(items))


def page_window(request: web.Request) -> tuple[int, int]:
    """Where a query page starts and how many items it may hold (x-ms-continuation, x-ms-max-item-count)."""
    try:
        size = int(request.headers.get("x-ms-max-item-count") or MAX_PAGE)
        start = int(request.headers.get("x-ms-continuation") or 0)
    except ValueError as exc:
        raise InvalidInput("x-ms-max-item-count and x-ms-continuation must be integers") from exc
    if not 1 <= size <= MAX_PAGE or not 0 <= start <= MAX_OFFSET:
        raise InvalidInput(f"x-ms-max-item-count must be 1-{MAX_PAGE} and x-ms-continuation 0-{MAX_OFFSET}")
    return start, size


def page_response(chunk: list[Any], item_type: str, start: int, size: int, *, more: bool) -> web.Response:
    """One query page; ``more``: a continuation to the next one."""
    headers = {"x-ms-item-type": item_type, "x-ms-max-item-count": str(size)}
    if more:
        headers["x-ms-continuation"] = str(start + size)
    return send(chunk, headers=headers)


def max_item_count(request: web.Request, default: int = MAX_PAGE) -> int:
    """The page size a query asks for with ``x-ms-max-item-count`` (1-:data:`MAX_PAGE`; ``default`` when absent)."""
    raw = request.headers.get("x-ms-max-item-count")
    try:
        size = int(raw) if raw else default
    except ValueError as exc:
        raise InvalidInput(f"x-ms-max-item-count must be an integer from 1 to {MAX_PAGE}") from exc
    if not 1 <= size <= MAX_PAGE:
        raise InvalidInput(f"x-ms-max-item-count must be an integer from 1 to {MAX_PAGE}")
    return size


def keyset_token(after: str | None) -> str | None:
    """The opaque continuation of a keyset page: the last key it held (None: it was the last page)."""
    return base64.urlsafe_b64encode(after.encode()).decode().rstrip("=") if after is not None else None


def keyset_after(token: str | None, name: str) -> str:
    """The key a page starts after, from a token :func:`keyset_token` gave (``name``: where it came from, for the
    error); "" for the first page."""
    if not token:
        return ""
    try:
        after = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"{name} is not one this service gave") from exc
    if not after or len(after) > 256 or not after.isprintable():  # a NUL in it: PostgreSQL's DataError, a 500
        raise InvalidInput(f"{name} is not one this service gave")
    return after


@overload
def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int: ...
@overload
def int_param(request: web.Request, name: str, default: None, low: int, high: int) -> int | None: ...
def int_param(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    """Query parameter ``name`` as an integer from ``low`` to ``high`` (``default`` when absent or empty); else a 400
    naming it. ASCII digits only (``str.isdigit`` also passes "²", which ``int`` refuses)."""
    raw = request.query.get(name) or ""
    if not raw:
        return default
    value = decimal(raw, len(str(high)))
    if value is None or not low <= value <= high:
        raise InvalidInput(f"{name} must be an integer from {low} to {high}, not {raw[:20]!r}")
    return value


def keyset_request(request: web.Request) -> tuple[int, str]:
    """A keyset-paged list's ``?top=N`` (1-1000, default 1000) and the key its page starts after
    (``?continuationToken=`` from the previous page)."""
    return (int_param(request, "top", MAX_PAGE, 1, MAX_PAGE),
            keyset_after(request.query.get("continuationToken"), "continuationToken"))


def keyset_page(items: list[Any], top: int, key: Callable[[Any], str]) -> dict[str, Any]:
    """``{"value": [...], "continuationToken"?}`` from up to ``top + 1`` items read (the extra one says more follow)."""
    body: dict[str, Any] = {"value": items[:top]}
    if len(items) > top:
        body["continuationToken"] = keyset_token(key(items[top - 1]))
    return body


def if_match(request: web.Request) -> str | None:
    return request.headers.get("If-Match")
