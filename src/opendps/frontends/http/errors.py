"""The HTTP side of the one error convention: an :class:`~opendps.errors.OpenDPSError` becomes its status and
an Azure error body ``{"errorCode", "trackingId", "message", "timestampUtc", "info"}``; anything else a 500
with a tracking id (and the traceback in the log). What aiohttp's own parser refuses before any middleware runs
(a bad request line or header, a line past 8190 octets) gets the same body: :class:`AzureAppRunner`."""

from __future__ import annotations

import json
import logging
import uuid
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from opendps.errors import OpenDPSError
from opendps.transport.wire import error_body

log = logging.getLogger("opendps.api")


def error_response(status: int, error_code: int, message: str, info: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None, tracking_id: str | None = None) -> web.Response:
    """An Azure error body; ``tracking_id``: the one the log names (else a fresh one)."""
    body = error_body(error_code, message, info)
    if tracking_id is not None:
        body["trackingId"] = tracking_id
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
    except (web.RequestPayloadError, HttpProcessingError) as exc:  # the body: a Content-Encoding that does not decode
        problem = _client_error_detail(exc)
        log.info("malformed request body in %s %s, answered 400: %s", request.method, request.path, problem)
        response = error_response(400, 400004, f"request body cannot be read: {problem}")
        response.force_close()  # aiohttp's parser gave up on the stream: this connection serves no further request
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.status * 1000 + 1
        reason = {404: f"no route for {request.method} {request.path}",
                  405: f"method {request.method} is not allowed on {request.path}",
                  413: "request body is too large"}.get(exc.status) or _http_exception_detail(exc)
        return error_response(exc.status, code, reason)
    except Exception:
        tracking = str(uuid.uuid4())
        log.exception("internal error handling %s %s (trackingId %s)", request.method, request.path, tracking)
        return error_response(500, 500000, f"internal server error (trackingId {tracking})", tracking_id=tracking)


def _http_exception_detail(exc: web.HTTPException) -> str:
    """What an aiohttp HTTP exception says, on one line: its own text where it has one (the WebSocket handshake's
    "Handshake error: ..."), else its reason phrase (the default text is only "400: Bad Request")."""
    text = exc.text or ""
    if not text or text == f"{exc.status}: {exc.reason}":
        return exc.reason
    return " ".join(text.split())[:200]


def _client_error_detail(exc: BaseException) -> str:
    """What aiohttp found wrong with a request, on one line: a :class:`~aiohttp.web.RequestPayloadError` (what reading
    a body that does not decode raises) carries its parser error as its cause."""
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc
    text = (cause.message if isinstance(cause, HttpProcessingError) else str(exc)) or type(exc).__name__
    return " ".join(word for word in text.split() if word != "^")[:200]  # the parser's caret line says nothing here


class ClientErrorsAreNotServerErrors(logging.Filter):
    """aiohttp logs a malformed request (bad header, line too long, garbage, a body that does not decode) at ERROR with
    a traceback, as if the server had failed. It is expected client behaviour: one INFO line naming the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            detail = _client_error_detail(exc)
            code = exc.code if isinstance(exc, HttpProcessingError) else 400  # a body: error_middleware answered 400
            record.msg = f"{record.getMessage()}: malformed request, answered {code}: {detail}"
            record.args = ()
            record.exc_info, record.exc_text = None, None
        return True


def quiet_client_errors() -> None:
    """Install :class:`ClientErrorsAreNotServerErrors` on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientErrorsAreNotServerErrors) for f in logger.filters):
        logger.addFilter(ClientErrorsAreNotServerErrors())


class AzureErrorRequestHandler(RequestHandler):
    """aiohttp's connection protocol, but what its own parser refuses — answered before any middleware runs, as
    plain text — gets an Azure error body like every other refusal, so a client reads one shape of error. Only
    :meth:`handle_error` differs: a well-formed request costs exactly what it costs aiohttp."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # aiohttp's log line and its "nothing sent yet" check
        if status >= 500:  # a handler that escaped the error middleware (never expected): the same 500 as there
            tracking = str(uuid.uuid4())
            log.error("HTTP %d answered by aiohttp itself (trackingId %s)", status, tracking)
            response = error_response(status, status * 1000, f"{HTTPStatus(status).phrase} (trackingId {tracking})",
                                      tracking_id=tracking)
        else:
            detail = _client_error_detail(exc) if exc is not None else " ".join((message or "").split())[:200]
            response = error_response(status, status * 1000 + 4, f"malformed HTTP request: {detail}")
        response.force_close()  # as aiohttp's: the parser gave up on this connection's stream
        return response


class AzureErrorServer(web.Server):
    """aiohttp's low-level server making :class:`AzureErrorRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        return AzureErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class AzureAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparseable requests with Azure error bodies (every listener of
    ``opendps serve``). aiohttp has no public hook for those answers: the server it makes is remade as an
    :class:`AzureErrorServer` with the same settings."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        try:  # aiohttp's private attributes (3.10-3.14): an aiohttp that renamed them keeps its plain-text 400s
            return AzureErrorServer(made.request_handler, request_factory=made.request_factory,
                                    handler_cancellation=made.handler_cancellation, loop=made._loop, **made._kwargs)
        except (AttributeError, TypeError) as exc:
            log.warning("aiohttp's own 400 answers stay plain text with this aiohttp (%s)", exc)
            return made
