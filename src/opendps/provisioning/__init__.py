"""DPS core (the registration authority): the DPS CA certificates, enrollments, attestation (a registry of
mechanisms), allocation, reprovisioning, registrations and operations, and the service's shared access
policies. Front ends call :class:`Provisioning`, :class:`Enrollments` and :class:`AccessPolicies`; they decide.

Owns ``dps_certificates``, ``enrollments``, ``registrations``, ``operations`` and ``access_policies``.
"""

from opendps.provisioning.access import AccessPolicies
from opendps.provisioning.ca_certificates import DpsCertificates

__all__ = ["AccessPolicies", "DpsCertificates"]
