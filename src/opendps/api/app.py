"""aiohttp application factory for the HTTPS listener."""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from opendps.api.auth import make_sas_middleware
from opendps.api.device import PollThrottle
from opendps.api.device import routes as device_routes
from opendps.api.enrollments import routes as enrollment_routes
from opendps.api.errors import error_middleware
from opendps.api.openapi import build_openapi
from opendps.api.service import routes as service_routes

MAX_BODY = 1024 * 1024


class DomainRunner:
    """The one bridge from the event loop to synchronous domain code: a bounded thread pool."""

    def __init__(self, workers: int = 8):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opendps-domain")

    async def run(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def make_app(instance) -> web.Application:  # noqa: ANN001 - opendps.instance.Instance
    """The HTTPS application: service API + ADR endpoints + /openapi.json."""
    from opendps.instance import OWNER_POLICY

    st = instance.settings
    hosts = {st.service_host, st.hostname}
    sas_mw = make_sas_middleware(hosts, instance.access_policy_keys, {OWNER_POLICY})
    app = web.Application(middlewares=[error_middleware, sas_mw], client_max_size=MAX_BODY)
    app["instance"] = instance
    app["domain"] = DomainRunner()
    openapi = json.dumps(build_openapi())

    async def openapi_handler(_request: web.Request) -> web.Response:
        return web.Response(text=openapi, content_type="application/json")

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_get("/healthz", health)
    app.add_routes(service_routes)
    app.add_routes(enrollment_routes)
    app.add_routes(device_routes)  # last: its paths start with a variable ID scope
    app["poll_throttle"] = PollThrottle()

    async def _close(app: web.Application) -> None:
        app["domain"].close()

    app.on_cleanup.append(_close)
    return app
