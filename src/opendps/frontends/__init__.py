"""Front ends: they translate a wire to domain calls and back, and decide nothing.

- :mod:`.http` — the HTTPS listener (aiohttp): management API, hub service API, DPS device API, MQTT over WebSockets;
- :mod:`.mqtt` — the MQTT listener: DPS and every hub's device endpoint, routed at CONNECT;
- :mod:`.amqp` — the hubs' AMQP listener (service-side cloud-to-device);
- :mod:`.device_request` — the DPS registration request, parsed once for HTTPS and MQTT;
- :mod:`.service_auth` — the service SAS check shared by HTTP and AMQP;
- :mod:`.runtime` — what they share in one process: the services, the domain thread pool, live hub state;
- :mod:`.metrics` — the Prometheus metrics they record, and ``GET /metrics``'s rendering;
- :mod:`.refusals` — the refusal log's writer (device requests refused, batched into ``audit.refusals``).

No domain package imports this package (``tests/test_architecture.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from opendps.frontends import metrics
from opendps.frontends.amqp import AmqpFrontEnd
from opendps.frontends.http import make_app
from opendps.frontends.mqtt.router import make_router
from opendps.frontends.runtime import DomainRunner, Runtime
from opendps.frontends.service_auth import SasAuthenticator
from opendps.provisioning.access import PolicyCredentials
from opendps.services import Services
from opendps.transport.amqp import AmqpLimits
from opendps.transport.mqtt.server import MqttServer


@dataclass
class FrontEnds:
    """Every front end of one process over one :class:`Runtime`; ``opendps serve`` puts them on their ports."""

    runtime: Runtime
    http: web.Application
    mqtt: MqttServer
    amqp: AmqpFrontEnd


def build(services: Services, *, service_hosts: set[str], client_timeout: float = 60.0) -> FrontEnds:
    """The front ends of one process. ``service_hosts``: the names service tokens may be issued for;
    ``client_timeout``: see :class:`Runtime`."""
    # SQLite: one core domain thread. Its writers take turns at the file's lock and its calls are CPU under the GIL
    # (no network round trips to overlap), so a second thread only contended for both: one thread took ~20 % less
    # CPU per registration and answered more of them per second (docs/benchmarks.md, session 23); a call that blocks
    # (a webhook, a lock held by another process) still hands the queue to the spare threads after the stall bound.
    # PostgreSQL: the default (2-4, by CPUs), whose threads overlap their round trips.
    runtime = Runtime(services, DomainRunner(core=1 if services.store.dialect == "sqlite" else None),
                      client_timeout=client_timeout)
    # what only the domain sees, told to the metrics through plain callables (the domain imports no prometheus)
    services.issuance.observer = lambda issuer, seconds: metrics.issued(issuer.label, seconds)
    services.c2d.on_expired = metrics.c2d_expired

    async def policy(name: str) -> PolicyCredentials | None:
        """A fresh cached answer on the loop; a miss (every few seconds per name) in the domain thread pool."""
        hit, credentials = services.access_policies.cached_credentials(name)
        if hit:
            return credentials
        return await runtime.domain.run(services.access_policies.credentials, name)

    async def hub_by_host(host: str) -> str | None:
        hub = await runtime.domain.run(services.hubs.by_host, host)
        return hub.name if hub is not None else None

    async def hub_keys(hub: str) -> tuple[str, str]:
        return await runtime.domain.run(services.hubs.owner_keys, hub)

    authenticator = SasAuthenticator(service_hosts, policy, hub_by_host, hub_keys)
    mqtt = MqttServer(make_router(runtime), connect_timeout=runtime.connect_deadline)
    amqp = AmqpFrontEnd(runtime, authenticator, AmqpLimits(open_timeout=runtime.connect_deadline))
    http = make_app(runtime, authenticator, mqtt)

    async def close(_app: web.Application) -> None:
        await amqp.close()
        await mqtt.close()
        await runtime.telemetry_router.close()
        await runtime.refusals.flush()
        runtime.domain.close()

    http.on_cleanup.append(close)  # the HTTPS runner's cleanup closes the other listeners and the thread pool
    return FrontEnds(runtime, http, mqtt, amqp)


__all__ = ["FrontEnds", "Runtime", "build"]
