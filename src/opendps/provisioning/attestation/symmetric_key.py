"""Symmetric-key attestation: a SharedAccessSignature over ``{idScope}/registrations/{registrationId}``.

The HMAC is over ``sr`` exactly as received (upper- or lower-case percent-encoding both verify);
``sr`` must name this ID scope and this registration. An individual enrollment for the
registration id wins; otherwise each symmetric-key group is tried with the derived device key
base64(HMAC-SHA256(group key, registrationId)). ``skn`` (``registration``) is optional.
Enrollments hold a primary and a secondary key (64 random bytes each when not given), wrapped at rest.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import unquote

from opendps.hub import DeviceCredential
from opendps.provisioning.attestation.mechanism import (
    HTTPS,
    MQTT,
    AttestationFailed,
    AttestedIdentity,
    Context,
    DeviceCredentials,
)
from opendps.provisioning.enrollments import GROUP, INDIVIDUAL, check_key, json_object, new_key
from opendps.transport import sas


def registration_token(credentials: DeviceCredentials, now: datetime, skew: int) -> sas.SasToken:
    """The device's SAS, checked for form, ``sr`` = ``{idScope}/registrations/{registrationId}`` and expiry (the
    signature is the caller's: which keys depends on the enrollment)."""
    try:
        token = sas.parse(credentials.authorization or "")
    except sas.SasError as exc:
        raise AttestationFailed(f"invalid SharedAccessSignature: {exc}", reason="sas_invalid") from exc
    expected = f"{credentials.id_scope}/registrations/{credentials.registration_id}"
    if unquote(token.raw_resource).lower() != expected.lower():
        raise AttestationFailed(f"SharedAccessSignature sr {token.resource!r} does not name {expected!r}",
                                reason="sas_invalid")
    if token.expiry + skew < now.timestamp():
        raise AttestationFailed("SharedAccessSignature has expired", reason="sas_expired")
    return token


def signed_with(token: sas.SasToken, keys: tuple[str, str]) -> bool:
    """Whether one of ``keys`` made the token's signature (expiry is checked once, by :func:`registration_token`)."""
    for key in keys:
        try:
            sas.verify(token, key, skew=10**9)
            return True
        except sas.SasError:
            continue
    return False


class SymmetricKeyAttestation:
    name = "symmetricKey"
    transports = frozenset({HTTPS, MQTT})

    def __init__(self, *, skew_seconds: int = sas.DEFAULT_SKEW_SECONDS) -> None:
        self.skew = skew_seconds

    def enrollment(self, kind: str, enrollment_id: str, attestation: dict[str, Any],
                   previous_keys: tuple[str, str] | None, context: Context) -> tuple[dict[str, Any], tuple[str, str] | None]:
        sk = json_object(attestation.get("symmetricKey"), "attestation.symmetricKey")
        primary, secondary = sk.get("primaryKey"), sk.get("secondaryKey")
        if primary is None and secondary is None and previous_keys:
            keys = previous_keys  # a PUT without keys keeps the enrollment's keys
        else:
            keys = (check_key(primary, "attestation.symmetricKey.primaryKey") if primary is not None else new_key(),
                    check_key(secondary, "attestation.symmetricKey.secondaryKey") if secondary is not None else new_key())
        return {"type": self.name, "symmetricKey": {}}, keys

    def presented(self, credentials: DeviceCredentials) -> bool:
        return credentials.authorization is not None

    def authenticate(self, credentials: DeviceCredentials, context: Context, *, now: datetime) -> AttestedIdentity:
        token = registration_token(credentials, now, self.skew)
        rid = credentials.registration_id
        individual = context.enrollments.lookup(INDIVIDUAL, rid)
        if individual is not None:
            # a TPM device signs its later requests (the poll, the status lookup) with the key its TPM imported:
            # the enrollment's key, so they verify here; over HTTPS only, as the TPM mechanism itself
            tpm = individual.attestation_type == "tpm" and credentials.transport == HTTPS
            if (individual.attestation_type != self.name and not tpm) or not individual.keys:
                raise AttestationFailed(f"enrollment {individual.enrollment_id!r} does not use symmetric-key attestation",
                                        reason="wrong_attestation")
            if not signed_with(token, individual.keys):
                raise AttestationFailed("SharedAccessSignature signature does not verify with the enrollment's keys",
                                        reason="sas_invalid")
            if tpm:
                return AttestedIdentity(rid, "tpm", individual, DeviceCredential("sas", keys=individual.keys),
                                        details={"tpm": {}})
            return AttestedIdentity(rid, self.name, individual, DeviceCredential("sas", keys=individual.keys),
                                    details={"symmetricKey": {}})
        for group in context.enrollments.lookup_all(GROUP, self.name):
            if not group.keys:
                continue
            derived = (sas.derive_device_key(group.keys[0], rid), sas.derive_device_key(group.keys[1], rid))
            if signed_with(token, derived):
                return AttestedIdentity(rid, self.name, group, DeviceCredential("sas", keys=derived),
                                        details={"symmetricKey": {"enrollmentGroupId": group.enrollment_id}})
        raise AttestationFailed(f"no symmetric-key enrollment or group accepts this signature for {rid!r}",
                                reason="no_enrollment")


MECHANISM = SymmetricKeyAttestation()
