"""The DPS device registration request (wire spec §1.2, §2.2), parsed once for every front end (HTTPS and MQTT).

``DeviceRegistration`` is ``{"registrationId", "payload", "csr", ...}``; members other than those three
(``tpm``...) are attestation evidence, handed to the mechanisms as sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opendps.errors import InvalidInput, PayloadTooLarge
from opendps.transport import shown
from opendps.transport.wire import parse_json

MAX_DEVICE_BODY = 32 * 1024
_OWN_MEMBERS = ("registrationId", "payload", "csr")


@dataclass(frozen=True)
class RegistrationBody:
    payload: Any = None  # handed to custom allocation and back to the device
    csr: Any = None  # base64 DER PKCS#10 (checked by provisioning)
    evidence: Mapping[str, Any] = field(default_factory=dict)


def parse_registration_body(raw: bytes, registration_id: str) -> RegistrationBody:
    """The body of a register (or status) request for ``registration_id``; an empty body is an empty registration."""
    if len(raw) > MAX_DEVICE_BODY:
        raise PayloadTooLarge(f"registration body is larger than {MAX_DEVICE_BODY} bytes")
    if not raw.strip():
        return RegistrationBody()
    body = parse_json(raw, "registration body")
    if not isinstance(body, dict):
        raise InvalidInput("registration body must be a JSON object (DeviceRegistration)")
    given = body.get("registrationId")
    if given is not None and not isinstance(given, str):  # str(true) was "True": it matched registration id "true"
        raise InvalidInput(f"registrationId in the body must be a JSON string, got {shown(given)}")
    if given is not None and given.lower() != registration_id.lower():
        raise InvalidInput(f"registrationId {shown(given)} in the body does not match the request's "
                           f"{shown(registration_id)}")
    evidence = {k: v for k, v in body.items() if k not in _OWN_MEMBERS and v is not None}
    return RegistrationBody(body.get("payload"), body.get("csr"), evidence)
