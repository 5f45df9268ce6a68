"""The IoT hub side: logical hubs, their device registries, twins and trusted CAs.

Provisioning uses only the identity API of :class:`Hubs` (create or move a device, apply a twin);
the device-facing MQTT endpoint comes with issue 4.
"""

from opendps.hub.registry import DeviceIdentity, HubNotFound, Hubs, HubView, TrustedCa

__all__ = ["DeviceIdentity", "HubNotFound", "HubView", "Hubs", "TrustedCa"]
