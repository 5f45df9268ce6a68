"""Connections to NATS (nats-py) for the live bus and the telemetry routes, with a bounded first attempt.

nats-py retries a first connection forever when reconnects are allowed, and its ``allow_reconnect=False`` can hang
as well (nats.py issue 645): a server started with an unreachable ``--bus`` never listened, logging a traceback every
two seconds, and a route whose NATS was down held its hub's telemetry without end. Here the first connection must
succeed within a deadline; once connected, the client reconnects by itself, forever.

An outage is told twice, when the connection is lost and when it is back (with how long it lasted), not once per
reconnection attempt: nats-py tries every two seconds, and each attempt was a log line per connection per process.
A URL's credentials (``nats://user:password@host``, ``nats://token@host``) are for nats-py only: every log line and
error names the servers by :func:`shown_url`, which leaves them out.

A NATS that stops answering without closing the socket (a host down, a partition) is found by PINGs every
``PING_INTERVAL`` s (nats-py's default, two minutes with two outstanding, took up to four minutes).

A ``tls://`` server is spoken to over TLS or not at all: nats-py upgrades only when the server's INFO says
``tls_required``, so a plain server (or anyone in the path rewriting INFO) got the route's CONNECT, credentials and
telemetry in the clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

PING_INTERVAL = 5  # seconds between PINGs; MAX_OUTSTANDING_PINGS unanswered ones mean the server is gone
MAX_OUTSTANDING_PINGS = 2
_USERINFO = re.compile(r"(://)([^/@\s]*)@")  # a server URL's user:password@ or token@


def shown_url(url: str) -> str:
    """``url`` (servers separated by commas) as log lines and errors may show it: each server's password or token
    replaced by ``***`` (``nats://user:***@host``, ``nats://***@host``), so that no line or answer carries it."""
    def hide(m: re.Match[str]) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if colon else f"{m.group(1)}***@"

    return _USERINFO.sub(hide, url)


class NatsUnreachable(ConnectionError):
    """No NATS server of the URL list answered within the deadline (or the connection is down for now)."""


def _client() -> Any:
    """A nats-py ``Client`` that holds a ``tls://`` server to TLS (imported on first use: only installations with a
    NATS bus or route need nats-py)."""
    from nats import errors
    from nats.aio.client import Client

    # a private method of nats-py (tested with 2.16): a release that renamed it would skip the check below silently
    if "initial_connection" not in inspect.signature(Client._process_info).parameters:  # pragma: no cover
        raise RuntimeError("this nats-py release has no Client._process_info(info, initial_connection): opendps "
                           "cannot hold tls:// NATS servers to TLS with it; install the nats-py release pyproject names")

    class TlsHeldClient(Client):  # type: ignore[misc]
        async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
            # the INFO a connection begins with, before nats-py decides on TLS and sends CONNECT: a tls:// URL
            # upgrades whatever the server says (tls_available: a server taking both), or stops here
            if initial_connection and self._current_server is not None and self._current_server.uri.scheme == "tls" \
                    and not info.get("tls_required"):
                if not info.get("tls_available"):
                    raise errors.Error("nats: secure connection not available: the URL asks for tls:// and the "
                                       "server offers no TLS")
                info["tls_required"] = True
            await super()._process_info(info, initial_connection)

    return TlsHeldClient()


async def connect(url: str, *, name: str, within: float,
                  log: logging.Logger | None = None, what: str = "NATS",
                  on_disconnected: Callable[[], Awaitable[None] | None] | None = None,
                  on_reconnected: Callable[[], Awaitable[None] | None] | None = None) -> Any:
    """A connected ``nats.aio.client.Client`` for ``url`` (servers separated by commas), or :class:`NatsUnreachable`
    naming the last error after ``within`` seconds. Every connection error is heard here (nats-py logs each with a
    traceback without an error callback). With ``log``, a lost connection is one warning and its return one info line,
    both naming ``what``; the attempts between are debug lines. ``on_disconnected`` / ``on_reconnected`` are called
    at those two moments (the connection closed for good by :meth:`close` or ``drain`` is neither)."""
    shown = shown_url(url)  # what the lines and errors below name: never the URL's credentials

    last: list[BaseException] = []
    # the last refusal the server itself gave (an authorization violation...): what a first connection that fails
    # names, rather than the connection reset that follows it — the server closes the socket after its -ERR
    refused: list[BaseException] = []
    lost_at: list[float] = []  # when the current outage began; empty while connected
    nc = _client()

    async def call(hook: Callable[[], Awaitable[None] | None] | None) -> None:
        if hook is not None:
            result = hook()
            if result is not None:
                await result

    async def noted(exc: Exception) -> None:
        from nats import errors

        last[:] = [exc]
        lost = isinstance(exc, OSError | TimeoutError | errors.UnexpectedEOF | errors.StaleConnectionError
                          | errors.ConnectionClosedError | errors.NoServersError)  # told by disconnected()
        if not lost:
            refused[:] = [exc]
        if log is not None and connected and not lost and not lost_at:  # a first attempt's: the caller's error names it
            log.warning("%s (%s): %s: %s", what, shown, type(exc).__name__, exc)  # e.g. a slow consumer, a permission
        elif log is not None:
            log.debug("%s (%s): %s: %s", what, shown, type(exc).__name__, exc)

    async def disconnected() -> None:
        if nc.is_closed or nc.is_draining or lost_at or not connected:
            return  # closed on purpose, already told, or still the first connection (the caller hears of that)
        lost_at.append(time.monotonic())
        if log is not None:
            reason = f" ({type(last[0]).__name__}: {last[0]})" if last else ""
            log.warning("%s: the connection to NATS %s was lost%s; reconnecting (said again when it is back)",
                        what, shown, reason)
        await call(on_disconnected)

    async def reconnected() -> None:
        began = lost_at.pop() if lost_at else None
        lost_at.clear()
        if log is not None:
            lasted = f" after {time.monotonic() - began:.1f} s" if began is not None else ""
            log.info("%s: connected to NATS %s again%s", what, shown, lasted)
        await call(on_reconnected)

    connected = False
    servers = [u.strip() for u in url.split(",")]
    try:
        await asyncio.wait_for(
            nc.connect(servers=servers, name=name, allow_reconnect=True, max_reconnect_attempts=-1,
                       connect_timeout=min(within, 5.0), error_cb=noted, disconnected_cb=disconnected,
                       reconnected_cb=reconnected, reconnect_time_wait=1, ping_interval=PING_INTERVAL,
                       max_outstanding_pings=MAX_OUTSTANDING_PINGS), within)
    except Exception as exc:  # noqa: BLE001 - nats-py raises many kinds; the caller gets one, with the reason
        reason = refused[0] if refused else last[0] if last else exc
        with contextlib.suppress(Exception):  # it never connected: nothing to close cleanly
            await nc.close()  # a first attempt given up on must not go on reconnecting in the background
        raise NatsUnreachable(f"no NATS server at {shown} answered within {within:g} s "
                              f"({type(reason).__name__}: {reason})") from None
    connected = True
    return nc
