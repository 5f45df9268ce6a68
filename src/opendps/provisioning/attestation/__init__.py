"""Attestation: how a device proves which enrollment it belongs to.

One module per mechanism (``x509``, ``symmetric_key``), each a :class:`Mechanism`: ``applies``
says whether the request carries its kind of credential, ``authenticate`` returns the
:class:`AttestedIdentity` or raises ``AttestationFailed`` (401) / ``EnrollmentDisabled`` (403).
Adding TPM later means adding one module and listing it in :data:`MECHANISMS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509

from opendps.errors import Forbidden, Unauthorized
from opendps.provisioning.enrollments import EnrollmentView


class AttestationFailed(Unauthorized):
    error_code = 401002


class EnrollmentDisabled(Forbidden):
    error_code = 403003


@dataclass(frozen=True)
class DeviceCredentials:
    """What a front end extracted from the wire; nothing here is trusted yet."""

    id_scope: str
    registration_id: str
    authorization: str | None = None  # SharedAccessSignature ... (HTTP header or MQTT password)
    client_chain: list[x509.Certificate] = field(default_factory=list)  # as sent in the TLS handshake, leaf first


@dataclass(frozen=True)
class AttestedIdentity:
    registration_id: str
    attestation_type: str  # x509 | symmetricKey
    enrollment: EnrollmentView
    hub_auth_type: str  # how the hub will authenticate the device without an issued certificate
    device_keys: tuple[str, str] | None = None  # SAS keys for the hub (symmetric key)
    thumbprints: tuple[str | None, str | None] = (None, None)  # self-signed device certificate (SHA-256)
    details: dict[str, Any] = field(default_factory=dict)  # registrationState.x509 / .symmetricKey


class Mechanism(Protocol):
    name: str

    def applies(self, credentials: DeviceCredentials) -> bool: ...

    def authenticate(self, credentials: DeviceCredentials, *, now: datetime) -> AttestedIdentity: ...


def require_enabled(identity: AttestedIdentity) -> AttestedIdentity:
    e = identity.enrollment
    if not e.enabled:
        what = "enrollment group" if e.kind == "group" else "enrollment"
        raise EnrollmentDisabled(f"{what} {e.enrollment_id!r} is disabled: registration refused")
    return identity
