"""A challenge-response attestation mechanism that exists only to prove the mechanism registry's promise:
adding a mechanism is this one module plus one line in ``opendps.provisioning.attestation.MODULES``.

It has what TPM attestation needs and the built-in mechanisms lack: its own enrollment member (a shared
secret, kept wrapped like symmetric keys), its own body member (``demo``), a transport restriction (HTTPS
only) and a round trip: a register without ``demo.response`` is answered with a challenge (401 +
``{"challenge": ...}``), and a register carrying HMAC(secret, challenge) is attested.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Any

from opendps.errors import InvalidInput
from opendps.hub import DeviceCredential
from opendps.provisioning.attestation.mechanism import (
    HTTPS,
    AttestationFailed,
    AttestedIdentity,
    Challenge,
    Context,
    DeviceCredentials,
)
from opendps.provisioning.enrollments import INDIVIDUAL, check_key, json_object

NAME = "demoChallenge"


def _mac(secret: str, message: str) -> str:
    return base64.b64encode(hmac.new(base64.b64decode(secret), message.encode(), hashlib.sha256).digest()).decode()


def challenge_for(secret: str, registration_id: str) -> str:
    return _mac(secret, f"challenge:{registration_id}")


def response_to(secret: str, challenge: str) -> str:
    return _mac(secret, challenge)


class DemoChallengeAttestation:
    name = NAME
    transports = frozenset({HTTPS})

    def enrollment(self, kind: str, enrollment_id: str, attestation: dict[str, Any],
                   previous_keys: tuple[str, str] | None, context: Context) -> tuple[dict[str, Any], tuple[str, str] | None]:
        if kind != INDIVIDUAL:
            raise InvalidInput(f"{NAME} attestation is for individual enrollments only")
        secret = check_key(json_object(attestation.get(NAME), f"attestation.{NAME}").get("secret"),
                           f"attestation.{NAME}.secret")
        return {"type": NAME, NAME: {}}, (secret, secret)

    def presented(self, credentials: DeviceCredentials) -> bool:
        return "demo" in credentials.evidence

    def authenticate(self, credentials: DeviceCredentials, context: Context, *,
                     now: datetime) -> AttestedIdentity | Challenge:
        enrollment = context.enrollments.find(INDIVIDUAL, credentials.registration_id)
        if enrollment is None or enrollment.attestation_type != NAME or not enrollment.keys:
            raise AttestationFailed(f"no {NAME} enrollment for {credentials.registration_id!r}")
        secret = enrollment.keys[0]
        challenge = challenge_for(secret, credentials.registration_id)
        answer = json_object(credentials.evidence.get("demo"), "demo").get("response")
        if answer is None:
            return Challenge({"challenge": challenge})
        if not hmac.compare_digest(str(answer), response_to(secret, challenge)):
            raise AttestationFailed("the challenge response does not verify")
        return AttestedIdentity(credentials.registration_id, NAME, enrollment,
                                DeviceCredential("sas", keys=(secret, secret)), details={NAME: {}})


MECHANISM = DemoChallengeAttestation()
