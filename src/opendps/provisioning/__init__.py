"""DPS core (the registration authority): the DPS CA certificates, enrollments, attestation (a registry of
mechanisms), allocation, reprovisioning, registrations and operations. Front ends call :class:`Provisioning`
and :class:`Enrollments`; they decide.

Owns ``dps_certificates``, ``enrollments``, ``registrations`` and ``operations``.
"""

from opendps.pki import CaCertificates
from opendps.store import DpsCertificate, Store


def dps_certificates(store: Store) -> CaCertificates:
    """The owner's CA certificates uploaded to DPS (seed steps 4-5), which X.509 enrollment groups reference."""
    return CaCertificates(store, DpsCertificate)


__all__ = ["dps_certificates"]
