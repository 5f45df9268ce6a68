"""Connections to NATS (nats-py) for the live bus and the telemetry routes, with a bounded first attempt.

nats-py retries a first connection forever when reconnects are allowed, and its ``allow_reconnect=False`` can hang
as well (nats.py issue 645): a server started with an unreachable ``--bus`` never listened, logging a traceback every
two seconds, and a route whose NATS was down held its hub's telemetry without end. Here the first connection must
succeed within a deadline; once connected, the client reconnects by itself, forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class NatsUnreachable(ConnectionError):
    """No NATS server of the URL list answered within the deadline."""


async def connect(url: str, *, name: str, within: float,
                  on_error: Callable[[Exception], Awaitable[None]] | None = None) -> Any:
    """A connected ``nats.aio.client.Client`` for ``url`` (servers separated by commas), or :class:`NatsUnreachable`
    naming the last error after ``within`` seconds. ``on_error`` hears every connection error (nats-py logs each
    with a traceback without one)."""
    import nats  # imported on first use: only installations with a NATS bus or route need it

    last: list[BaseException] = []

    async def noted(exc: Exception) -> None:
        last[:] = [exc]
        if on_error is not None:
            await on_error(exc)

    servers = [u.strip() for u in url.split(",")]
    try:
        return await asyncio.wait_for(
            nats.connect(servers=servers, name=name, allow_reconnect=True, max_reconnect_attempts=-1,
                         connect_timeout=min(within, 5.0), error_cb=noted), within)
    except Exception as exc:  # noqa: BLE001 - nats-py raises many kinds; the caller gets one, with the reason
        reason = last[0] if last else exc
        raise NatsUnreachable(f"no NATS server at {url} answered within {within:g} s "
                              f"({type(reason).__name__}: {reason})") from None
