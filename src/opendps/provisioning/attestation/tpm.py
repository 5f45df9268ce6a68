"""TPM 2.0 attestation (individual enrollments only, over HTTPS only — as Azure DPS).

The enrollment holds the TPM's endorsement key (``attestation.tpm.endorsementKey``, a TPM2B_PUBLIC) and, like a
symmetric-key enrollment, a key pair wrapped at rest (generated: 32 random bytes each). The round trip:

1. The device sends ``tpm{endorsementKey, storageRootKey}`` without ``Authorization``. Its EK must be the
   enrollment's (the whole public area: the EK template is the device maker's business, the server encrypts to
   the one enrolled), and so must its SRK when the enrollment names one. The answer is a :class:`Challenge`: 401
   with ``authenticationKey`` — the enrollment's primary key duplicated to that TPM
   (``opendps.pki.tpm.make_challenge``: a credential only the EK can activate, bound to the SRK's name, wrapping
   the key for import under the SRK) — and ``keyName: "registration"``.
2. The device activates the credential, imports the key into its TPM (it never leaves it) and signs a
   SharedAccessSignature over ``{idScope}/registrations/{registrationId}`` with it, and sends the register again
   with that ``Authorization``: verified with the enrollment's keys as a symmetric-key signature is.
3. ``registrationState.tpm.authenticationKey`` carries the same kind of blob (the SDKs import it as the hub key);
   the hub identity authenticates with the same keys (SAS).

Polls carry only the SAS: the symmetric-key mechanism verifies them with a TPM enrollment's keys (see there).
The keys are the TPM's: a PUT that keeps the EK keeps them; one that names another EK (or turns another type
into TPM) makes new ones, so a replaced TPM's imported key no longer registers.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime
from typing import Any

from opendps.errors import InvalidInput
from opendps.hub import DeviceCredential
from opendps.pki.tpm import EndorsementKey, StorageRootKey, make_challenge
from opendps.provisioning.attestation.mechanism import (
    HTTPS,
    AttestationFailed,
    AttestedIdentity,
    Challenge,
    Context,
    DeviceCredentials,
    EnrollmentDisabled,
)
from opendps.provisioning.attestation.symmetric_key import registration_token, signed_with
from opendps.provisioning.enrollments import GROUP, INDIVIDUAL, json_object
from opendps.transport import sas

KEY_BYTES = 32  # the HMAC key imported into the TPM (a keyed-hash object's sensitive data)


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def _absent(value: object) -> bool:
    """Not given (null or ""): any other value is parsed, and a number, array or object refused by name."""
    return value is None or value == ""


def _evidence(credentials: DeviceCredentials) -> tuple[EndorsementKey, StorageRootKey]:
    tpm = credentials.evidence.get("tpm")
    if not isinstance(tpm, dict):
        raise InvalidInput("tpm must be a JSON object with endorsementKey and storageRootKey")
    if _absent(tpm.get("endorsementKey")):
        raise InvalidInput("tpm.endorsementKey is required")
    if _absent(tpm.get("storageRootKey")):
        raise InvalidInput("tpm.storageRootKey is required: the challenge is bound to the storage root key")
    return (EndorsementKey.parse(tpm["endorsementKey"], "tpm.endorsementKey"),
            StorageRootKey.parse(tpm["storageRootKey"], "tpm.storageRootKey"))


class TpmAttestation:
    name = "tpm"
    transports = frozenset({HTTPS})  # Azure DPS has no TPM over MQTT

    def __init__(self, *, skew_seconds: int = sas.DEFAULT_SKEW_SECONDS) -> None:
        self.skew = skew_seconds

    def enrollment(self, kind: str, enrollment_id: str, attestation: dict[str, Any],
                   previous_keys: tuple[str, str] | None, context: Context) -> tuple[dict[str, Any], tuple[str, str] | None]:
        if kind == GROUP:
            raise InvalidInput("TPM attestation is for individual enrollments only (as in Azure DPS)")
        tpm = json_object(attestation.get("tpm"), "attestation.tpm")
        if _absent(tpm.get("endorsementKey")):
            raise InvalidInput("attestation.tpm.endorsementKey is required (the TPM's EK as base64 TPM2B_PUBLIC)")
        ek = EndorsementKey.parse(tpm["endorsementKey"], "attestation.tpm.endorsementKey")
        document: dict[str, Any] = {"type": self.name, "tpm": {"endorsementKey": ek.base64}}
        if not _absent(tpm.get("storageRootKey")):
            srk = StorageRootKey.parse(tpm["storageRootKey"], "attestation.tpm.storageRootKey")
            document["tpm"]["storageRootKey"] = base64.b64encode(srk.tpm2b_public).decode()
        if previous_keys is not None and not self._same_tpm(kind, enrollment_id, ek, context):
            # another TPM: the key the old one imported (it keeps it) must not register, nor be handed to the new one
            previous_keys = None
        return document, previous_keys or (_new_key(), _new_key())

    @staticmethod
    def _same_tpm(kind: str, enrollment_id: str, ek: EndorsementKey, context: Context) -> bool:
        """Whether the enrollment being replaced names the same EK (its keys are then that TPM's to keep)."""
        previous = context.enrollments.find(kind, enrollment_id)
        if previous is None or previous.attestation_type != TpmAttestation.name:
            return False
        return EndorsementKey.parse(previous.document["attestation"]["tpm"]["endorsementKey"]).same_key(ek)

    def presented(self, credentials: DeviceCredentials) -> bool:
        return "tpm" in credentials.evidence

    def authenticate(self, credentials: DeviceCredentials, context: Context, *,
                     now: datetime) -> AttestedIdentity | Challenge:
        ek, srk = _evidence(credentials)
        rid = credentials.registration_id
        enrollment = context.enrollments.lookup(INDIVIDUAL, rid)
        if enrollment is None:
            raise AttestationFailed(f"no TPM enrollment for registration {rid!r}", error_code=401002,
                                    reason="no_enrollment")
        if enrollment.attestation_type != self.name or not enrollment.keys:
            raise AttestationFailed(f"enrollment {enrollment.enrollment_id!r} does not use TPM attestation",
                                    reason="wrong_attestation")
        enrolled = EndorsementKey.parse(enrollment.document["attestation"]["tpm"]["endorsementKey"])
        if not enrolled.same_key(ek):
            raise AttestationFailed(f"the endorsement key sent is not the one enrolled for {rid!r}",
                                    reason="tpm_mismatch")
        pinned = enrollment.document["attestation"]["tpm"].get("storageRootKey")
        if pinned and StorageRootKey.parse(pinned).public.public_area != srk.public.public_area:
            # an enrollment that names the SRK takes only that owner's (a cleared TPM has a new SRK: enroll it)
            raise AttestationFailed(f"the storage root key sent is not the one enrolled for {rid!r}",
                                    reason="tpm_mismatch")
        if not enrollment.enabled:  # no key handed out for a disabled enrollment
            raise EnrollmentDisabled(f"enrollment {enrollment.enrollment_id!r} is disabled: registration refused")
        if credentials.authorization is None:
            # the enrolled EK (the same key): whatever the device sent, the blob is made to what was enrolled
            challenge = make_challenge(enrolled, srk, base64.b64decode(enrollment.keys[0]))
            return Challenge({"message": "TPM attestation: activate the credential, import the key and sign a "
                                         "SharedAccessSignature with it", "authenticationKey": challenge.authentication_key,
                              "keyName": "registration"})
        if not signed_with(registration_token(credentials, now, self.skew), enrollment.keys):
            raise AttestationFailed("SharedAccessSignature signature does not verify with the key given to this TPM",
                                    reason="sas_invalid")
        # registrationState.tpm.authenticationKey: the hub key for the SDKs to import (the same key, freshly wrapped)
        hub_blob = make_challenge(enrolled, srk, base64.b64decode(enrollment.keys[0])).authentication_key
        return AttestedIdentity(rid, self.name, enrollment, DeviceCredential("sas", keys=enrollment.keys),
                                details={"tpm": {"authenticationKey": hub_blob}})


MECHANISM = TpmAttestation()
