"""The IoT hub side: logical hubs, their device registries, twins and trusted CAs (:mod:`.registry`), device
authentication at CONNECT (:mod:`.auth`), live sessions and where devices are connected (:mod:`.live`,
:mod:`.presence`), telemetry (:mod:`.telemetry`) and its routes to NATS (:mod:`.routing`), the cloud-to-device
queue (:mod:`.messaging`) and the twin query language (:mod:`.query`).

Provisioning places devices with :meth:`Hubs.place_device`; front ends (MQTT for devices, REST and AMQP for
the service side) translate to these calls.
"""

from opendps.hub.auth import AuthenticatedDevice, HubAuthenticator
from opendps.hub.live import DeviceLink, DeviceOffline, LiveSessions, MethodTimeout, Peers
from opendps.hub.messaging import CloudToDevice, PendingMessage, QueueFull
from opendps.hub.presence import Presence
from opendps.hub.registry import (
    DEFAULT_HUB,
    DeviceCredential,
    DeviceIdentity,
    EnrollmentLinks,
    Hubs,
    HubView,
    QueryPage,
    TrustedCa,
    TwinAction,
    initial_twin,
)
from opendps.hub.routing import NatsRouter, RouteView, TelemetryRoutes
from opendps.hub.telemetry import GroupCommit, TelemetryBus, TelemetrySink

__all__ = [
    "DEFAULT_HUB",
    "AuthenticatedDevice",
    "CloudToDevice",
    "DeviceCredential",
    "DeviceIdentity",
    "DeviceLink",
    "DeviceOffline",
    "EnrollmentLinks",
    "GroupCommit",
    "HubAuthenticator",
    "HubView",
    "Hubs",
    "LiveSessions",
    "MethodTimeout",
    "NatsRouter",
    "Peers",
    "PendingMessage",
    "Presence",
    "QueryPage",
    "QueueFull",
    "RouteView",
    "TelemetryBus",
    "TelemetryRoutes",
    "TelemetrySink",
    "TrustedCa",
    "TwinAction",
    "initial_twin",
]
