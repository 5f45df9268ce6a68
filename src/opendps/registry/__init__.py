"""ADR (Azure Device Registry): namespaces, their credential (root CA) and policies (issuing CAs), and the
device registry of each namespace.

The registry decides lifecycle (names, limits, references); :mod:`opendps.pki` makes the keys and
certificates; :mod:`opendps.store` keeps them. Owns ``namespaces``, ``policies``,
``certificate_authorities`` and ``device_records``.
"""

from opendps.registry.devices import DeviceRecordView, DeviceRegistry
from opendps.registry.namespaces import (
    MAX_VALIDITY_DAYS,
    MIN_VALIDITY_DAYS,
    CredentialView,
    IssuingCa,
    IssuingCaRevocation,
    IssuingCaView,
    NamespaceView,
    PolicyRef,
    PolicyReferrers,
    PolicyView,
    Registry,
)

__all__ = [
    "MAX_VALIDITY_DAYS",
    "MIN_VALIDITY_DAYS",
    "CredentialView",
    "DeviceRecordView",
    "DeviceRegistry",
    "IssuingCa",
    "IssuingCaRevocation",
    "IssuingCaView",
    "NamespaceView",
    "PolicyRef",
    "PolicyReferrers",
    "PolicyView",
    "Registry",
]
