"""Attestation: how a device proves which enrollment it belongs to.

A registry of mechanisms keyed by attestation type: one module per mechanism (``x509``,
``symmetric_key``), each defining ``MECHANISM``, an object following :class:`Mechanism`. Adding one
(TPM) means one new module and one line in :data:`MODULES`. A request is matched against the
mechanisms in that order: the first whose credential it carries decides.
"""

from __future__ import annotations

import importlib

from opendps.provisioning.attestation.mechanism import (
    HTTPS,
    MQTT,
    AttestationFailed,
    AttestedIdentity,
    Challenge,
    Context,
    DeviceCredentials,
    EnrollmentDisabled,
    Mechanism,
)

#: one line per mechanism: its module in this package (or a full module path), in the order requests are matched
MODULES: tuple[str, ...] = (
    "tpm",  # before symmetric_key: a TPM's answer to its challenge carries a SAS too, and its tpm evidence
    "symmetric_key",
    "x509",
)


def mechanisms() -> dict[str, Mechanism]:
    """Attestation type -> mechanism, in matching order."""
    loaded: dict[str, Mechanism] = {}
    for name in MODULES:
        module = importlib.import_module(name if "." in name else f"{__name__}.{name}")
        mechanism: Mechanism = module.MECHANISM
        loaded[mechanism.name] = mechanism
    return loaded


__all__ = [
    "HTTPS",
    "MODULES",
    "MQTT",
    "AttestationFailed",
    "AttestedIdentity",
    "Challenge",
    "Context",
    "DeviceCredentials",
    "EnrollmentDisabled",
    "Mechanism",
    "mechanisms",
]
