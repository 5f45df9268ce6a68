"""ADR (device registry): namespaces, their credential (root CA) and policies (issuing CAs).

The registry decides lifecycle (names, limits, references); :mod:`opendps.pki` makes the keys and
certificates; :mod:`opendps.store` keeps them.
"""

from opendps.registry.devices import DeviceRecordView, DeviceRegistry
from opendps.registry.namespaces import (
    MAX_VALIDITY_DAYS,
    MIN_VALIDITY_DAYS,
    CredentialView,
    NamespaceView,
    PolicyView,
    Registry,
)

__all__ = [
    "DeviceRecordView",
    "DeviceRegistry",
    "MAX_VALIDITY_DAYS",
    "MIN_VALIDITY_DAYS",
    "CredentialView",
    "NamespaceView",
    "PolicyView",
    "Registry",
]
