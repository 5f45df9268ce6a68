"""The HTTP side of the one error convention: an :class:`~opendps.errors.OpenDPSError` becomes its status and
an Azure error body ``{"errorCode", "trackingId", "message", "timestampUtc", "info"}``; anything else a 500
with a tracking id (and the traceback in the log)."""

from __future__ import annotations

import json
import logging
import uuid

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from opendps.errors import OpenDPSError
from opendps.transport.wire import error_body

log = logging.getLogger("opendps.api")


def error_response(status: int, error_code: int, message: str, info: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = error_body(error_code, message, info)
    return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                        headers={"x-ms-error-code": str(error_code), **(headers or {})})


def from_exception(exc: OpenDPSError) -> web.Response:
    headers = {"Retry-After": exc.info["retryAfter"]} if "retryAfter" in exc.info else None
    return error_response(exc.status, exc.error_code, exc.message, exc.info, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OpenDPSError as exc:
        return from_exception(exc)
    except ConnectionResetError:  # the client went away mid-request (aiohttp's ClientConnectionResetError is one)
        log.info("client went away during %s %s", request.method, request.path)
        raise  # aiohttp drops the response quietly
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.status * 1000 + 1
        reason = {404: f"no route for {request.method} {request.path}",
                  405: f"method {request.method} is not allowed on {request.path}",
                  413: "request body is too large"}.get(exc.status, exc.reason)
        return error_response(exc.status, code, reason)
    except Exception:
        tracking = str(uuid.uuid4())
        log.exception("internal error handling %s %s (trackingId %s)", request.method, request.path, tracking)
        return error_response(500, 500000, f"internal server error (trackingId {tracking})")


class ClientErrorsAreNotServerErrors(logging.Filter):
    """aiohttp logs a malformed request (bad header, line too long, garbage) at ERROR with a traceback, as if the
    server had failed. It is expected client behaviour: one INFO line naming the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            detail = " ".join(str(exc.message or type(exc).__name__).split())[:200]
            record.msg = f"{record.getMessage()}: malformed request, answered {exc.code}: {detail}"
            record.args = ()
            record.exc_info, record.exc_text = None, None
        return True


def quiet_client_errors() -> None:
    """Install :class:`ClientErrorsAreNotServerErrors` on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientErrorsAreNotServerErrors) for f in logger.filters):
        logger.addFilter(ClientErrorsAreNotServerErrors())
