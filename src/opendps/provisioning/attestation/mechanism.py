"""What an attestation mechanism is, and what it gets and gives (step-ca's provisioner interface, for DPS).

A mechanism owns three things for its attestation type: the enrollment's ``attestation`` member
(:meth:`Mechanism.enrollment` validates and normalises it), the credential a device presents
(:meth:`Mechanism.presented`), and the proof (:meth:`Mechanism.authenticate`), which ends in the
:class:`AttestedIdentity` of an enrollment or, for mechanisms with a round trip (TPM), a
:class:`Challenge` the front end sends back instead of an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509

from opendps.errors import Forbidden, Unauthorized
from opendps.hub import DeviceCredential

if TYPE_CHECKING:
    from opendps.pki import CaCertificates
    from opendps.provisioning.enrollments import Enrollments, EnrollmentView

HTTPS = "https"
MQTT = "mqtt"


class AttestationFailed(Unauthorized):
    """The device did not prove it belongs to an enrollment."""


class EnrollmentDisabled(Forbidden):
    error_code = 403003


@dataclass(frozen=True)
class DeviceCredentials:
    """What a front end extracted from a device request; nothing here is trusted yet."""

    id_scope: str
    registration_id: str
    authorization: str | None = None  # SharedAccessSignature ... (HTTP header or MQTT password)
    client_chain: tuple[x509.Certificate, ...] = ()  # as sent in the TLS handshake, leaf first
    # members of the registration body other than registrationId, payload and csr (e.g. "tpm"), as sent
    evidence: Mapping[str, Any] = field(default_factory=dict)
    transport: str = HTTPS


@dataclass(frozen=True)
class AttestedIdentity:
    registration_id: str
    attestation_type: str  # the mechanism's name: x509 | symmetricKey
    enrollment: EnrollmentView
    hub_credential: DeviceCredential  # how the hub authenticates the device when no certificate is issued
    details: dict[str, Any] = field(default_factory=dict)  # registrationState.x509 / .symmetricKey


@dataclass(frozen=True)
class Challenge:
    """Not yet attested: send ``body`` with ``status`` and let the device answer (e.g. TPM's authenticationKey)."""

    body: dict[str, Any]
    status: int = 401


@dataclass(frozen=True)
class Context:
    """What mechanisms may read: the enrollments and the DPS CA certificates (both owned by provisioning)."""

    enrollments: Enrollments
    ca_certificates: CaCertificates


class Mechanism(Protocol):
    """One attestation mechanism. ``name`` is its enrollment ``attestation.type``."""

    name: str
    transports: frozenset[str]  # device transports that can carry its credential

    def enrollment(self, kind: str, enrollment_id: str, attestation: dict[str, Any],
                   previous_keys: tuple[str, str] | None, context: Context) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """Validate an enrollment's ``attestation`` member: (its stored form, symmetric keys to keep wrapped)."""
        ...

    def presented(self, credentials: DeviceCredentials) -> bool:
        """Whether the request carries this mechanism's kind of credential."""
        ...

    def authenticate(self, credentials: DeviceCredentials, context: Context, *,
                     now: datetime) -> AttestedIdentity | Challenge:
        """The enrollment the credential proves, a challenge to answer, or AttestationFailed (401)."""
        ...
