"""Process wiring for ``opendps serve``: listeners, signals, startup banner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from opendps.api import make_app
from opendps.transport.tls import server_context

log = logging.getLogger("opendps")


async def serve(instance, *, ready: asyncio.Event | None = None) -> None:  # noqa: ANN001
    """Run the HTTPS listener until cancelled or signalled."""
    st = instance.settings
    app = make_app(instance)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ctx = server_context(instance.server_cert_path, instance.server_key_path)
    site = web.TCPSite(runner, st.host, st.https_port, ssl_context=ctx, reuse_address=True, backlog=1024)
    await site.start()
    print(f"opendps listening on https://{st.host}:{st.https_port} (public name {st.service_host})", flush=True)
    print(f"  ID scope:           {instance.id_scope}", flush=True)
    print(f"  trust this CA:      {instance.server_ca_path.resolve()}", flush=True)
    print(f"  owner connection:   {instance.owner_connection_string()}", flush=True)
    print(f"  OpenAPI document:   https://{st.service_host}/openapi.json", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # non-main thread / Windows
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        print("opendps shutting down", flush=True)
        await runner.cleanup()


def run(instance) -> None:  # noqa: ANN001
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(instance))
