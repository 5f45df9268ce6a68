"""The running server's own TLS certificate: a hub linked (or re-named) while ``opendps serve`` runs is served at
once, by every process of every node, without a restart.

Each server process runs :func:`keep_server_certificate` on its loop. It reads the configuration counter
(:meth:`opendps.store.Store.config_generation`: one tiny SELECT, bumped in the same transaction as any change to
the linked hubs) every ``interval`` seconds; only when the counter moved does it list the hubs, and only when the
certificate it serves does not carry one of their host names (or expires within 30 days) does it call
:func:`opendps.instance.ensure_server_certificate`: under the data directory's lock, that takes the pair on disk
if another process of this data directory already wrote one that covers them, or issues a new one (same profile,
signed by the server CA whose key is in the database) and writes it. The new pair then goes into the listeners'
TLS contexts (:func:`opendps.transport.tls.replace_context`): new connections get it at once, connections already
open keep theirs. Database reads, signing and file I/O run in threads, never on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from OpenSSL import SSL

from opendps.instance import Instance, ServerCertificate, ensure_server_certificate, server_names
from opendps.transport.tls import context_serving, replace_context

log = logging.getLogger("opendps.tls")

RETRY_AFTER_FAILURE = 5.0  # seconds before the next try after a failed check (database away, CA key unreadable)
REPORT_EVERY = 60.0  # at most one log line a minute while checks keep failing


def _one_line(exc: BaseException) -> str:
    """A driver's own message, first line (never SQLAlchemy's statement parameters)."""
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else ""


def _hub_host_names(instance: Instance) -> list[str]:
    return [hub.host_name for hub in instance.services.hubs.list()]


def _contexts_serving(contexts: Sequence[SSL.Context], certificate: ServerCertificate) -> list[SSL.Context]:
    return [context_serving(ctx, certificate.chain, certificate.key) for ctx in contexts]


async def keep_server_certificate(instance: Instance, contexts: Sequence[SSL.Context], *,
                                  interval: float = 1.0) -> None:
    """Keep ``contexts`` (the listeners' :func:`~opendps.transport.tls.device_tls_context`\\ s) serving a certificate
    that carries every linked hub's host name; runs until cancelled.

    The first round installs the pair on disk as checked under the lock (the listeners read the files at start,
    unlocked; so a pair replaced by another process in that moment is corrected within one interval).
    """
    if interval <= 0:
        raise ValueError("interval must be positive")
    seen: int | None = None  # configuration counter the served certificate was checked against
    served: ServerCertificate | None = None
    failing = False
    reported = -REPORT_EVERY
    while True:
        try:
            generation = await asyncio.to_thread(instance.store.config_generation)
            if generation != seen or served is None or not served.fresh():
                names = server_names(instance, await asyncio.to_thread(_hub_host_names, instance))
                if served is None or not served.serves(names):
                    certificate = await asyncio.to_thread(ensure_server_certificate, instance, names)
                    if served is None or certificate.leaf != served.leaf:
                        fresh = await asyncio.to_thread(_contexts_serving, contexts, certificate)
                        for ctx, successor in zip(contexts, fresh, strict=True):  # on the loop: between connections
                            replace_context(ctx, successor)
                        if served is not None:
                            log.info("serving a new TLS server certificate (serial %x) for %s",
                                     certificate.leaf.serial_number, ", ".join(names))
                    served = certificate
                seen = generation
            if failing:
                log.info("server certificate checks work again")
                failing = False
        except Exception as exc:  # noqa: BLE001 - keep serving the current certificate, try again
            failing, now = True, time.monotonic()
            if now - reported >= REPORT_EVERY:
                reported = now
                log.warning("cannot check the TLS server certificate against the linked hubs (%s: %s); still serving "
                            "the current one, retrying", type(exc).__name__, _one_line(exc))
            await asyncio.sleep(max(interval, RETRY_AFTER_FAILURE))
            continue
        await asyncio.sleep(interval)
