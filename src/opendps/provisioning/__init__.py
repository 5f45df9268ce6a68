"""DPS core (the registration authority): the DPS CA certificates, enrollments, attestation (a registry of
mechanisms), allocation, reprovisioning, registrations and operations. Front ends call :class:`Provisioning`
and :class:`Enrollments`; they decide.

Owns ``dps_certificates``, ``enrollments``, ``registrations`` and ``operations``.
"""

from opendps.provisioning.ca_certificates import DpsCertificates

__all__ = ["DpsCertificates"]
