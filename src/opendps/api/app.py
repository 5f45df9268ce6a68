"""aiohttp application factory for the HTTPS listener."""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from opendps.api.amqp import AmqpFrontEnd
from opendps.api.auth import SasAuthenticator, make_sas_middleware
from opendps.api.device import PollThrottle
from opendps.api.device import routes as device_routes
from opendps.api.enrollments import routes as enrollment_routes
from opendps.api.errors import error_middleware
from opendps.api.hub_service import routes as hub_routes
from opendps.api.mqtt import make_authenticator
from opendps.api.openapi import build_openapi
from opendps.api.service import routes as service_routes
from opendps.hub.endpoint import HubEndpoint
from opendps.hub.telemetry import TelemetryBus
from opendps.transport.mqtt.server import MqttServer

MAX_BODY = 1024 * 1024


async def mqtt_over_websocket(request: web.Request) -> web.WebSocketResponse:
    """MQTT over WebSockets (``/$iothub/websocket``, subprotocol ``mqtt``), as the Azure SDKs use with websockets=True."""
    ws = web.WebSocketResponse(protocols=("mqtt",), max_msg_size=0)
    await ws.prepare(request)
    transport = request.transport
    chain = (transport.get_extra_info("peer_certificate_chain") if transport is not None else None) or []
    peer = transport.get_extra_info("peername") if transport is not None else None
    await request.app["mqtt"].serve_websocket(ws, peer_certificate_chain=list(chain), peername=peer)
    return ws


class DomainRunner:
    """The one bridge from the event loop to synchronous domain code: a bounded thread pool."""

    def __init__(self, workers: int = 8):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opendps-domain")

    async def run(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def make_app(instance) -> web.Application:  # noqa: ANN001 - opendps.instance.Instance
    """The HTTPS application (management, hub service and device APIs, MQTT over WebSockets), and in
    ``app["mqtt"]`` / ``app["amqp"]`` the MQTT server and the hubs' AMQP front end that ``opendps serve``
    also puts on their ports."""
    st = instance.settings
    domain = DomainRunner()

    async def hub_by_host(host: str) -> str | None:
        hub = await domain.run(instance.hubs.by_host, host)
        return hub.name if hub is not None else None

    authenticator = SasAuthenticator({st.service_host, st.hostname}, instance.access_policy_keys, hub_by_host)
    sas_mw = make_sas_middleware(authenticator)
    app = web.Application(middlewares=[error_middleware, sas_mw], client_max_size=MAX_BODY)
    app["instance"] = instance
    app["domain"] = domain
    app["poll_throttle"] = PollThrottle()
    app["telemetry_bus"] = TelemetryBus()
    app["hub_endpoint"] = HubEndpoint(instance, domain, app["telemetry_bus"])
    app["mqtt"] = MqttServer(make_authenticator(instance, domain, app["hub_endpoint"], app["poll_throttle"]))
    app["amqp"] = AmqpFrontEnd(app, authenticator)  # service-side C2D over AMQP; `serve` puts it on --amqp-port
    openapi = json.dumps(build_openapi())

    async def openapi_handler(_request: web.Request) -> web.Response:
        return web.Response(text=openapi, content_type="application/json")

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_get("/healthz", health)
    app.router.add_get("/$iothub/websocket", mqtt_over_websocket, name="device:mqtt-websocket")
    app.add_routes(service_routes)
    app.add_routes(enrollment_routes)
    app.add_routes(hub_routes)
    app.add_routes(device_routes)  # last: its paths start with a variable ID scope

    async def _close(app: web.Application) -> None:
        await app["amqp"].close()
        await app["mqtt"].close()
        app["domain"].close()

    app.on_cleanup.append(_close)
    return app
