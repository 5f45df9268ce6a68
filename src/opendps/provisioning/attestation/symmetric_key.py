"""Symmetric-key attestation: a SharedAccessSignature over ``{idScope}/registrations/{registrationId}``.

The HMAC is over ``sr`` exactly as received (upper- or lower-case percent-encoding both verify);
``sr`` must name this ID scope and this registration. An individual enrollment for the
registration id wins; otherwise each symmetric-key group is tried with the derived device key
base64(HMAC-SHA256(group key, registrationId)). ``skn`` (``registration``) is optional.
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import unquote

from opendps.provisioning.attestation import AttestationFailed, AttestedIdentity, DeviceCredentials
from opendps.provisioning.enrollments import GROUP, INDIVIDUAL, Enrollments, derive_device_key
from opendps.transport import sas


class SymmetricKeyAttestation:
    name = "symmetricKey"

    def __init__(self, enrollments: Enrollments, *, skew_seconds: int = sas.DEFAULT_SKEW_SECONDS):
        self.enrollments = enrollments
        self.skew = skew_seconds

    def applies(self, credentials: DeviceCredentials) -> bool:
        return credentials.authorization is not None

    @staticmethod
    def _matches(token: sas.SasToken, keys: tuple[str, str]) -> bool:
        for key in keys:
            try:
                sas.verify(token, key, skew=10**9)  # expiry is checked once, below
                return True
            except sas.SasError:
                continue
        return False

    def authenticate(self, credentials: DeviceCredentials, *, now: datetime) -> AttestedIdentity:
        try:
            token = sas.parse(credentials.authorization or "")
        except sas.SasError as exc:
            raise AttestationFailed(f"invalid SharedAccessSignature: {exc}") from exc
        expected = f"{credentials.id_scope}/registrations/{credentials.registration_id}"
        if unquote(token.raw_resource).lower() != expected.lower():
            raise AttestationFailed(f"SharedAccessSignature sr {token.resource!r} does not name {expected!r}")
        if token.expiry + self.skew < now.timestamp():
            raise AttestationFailed("SharedAccessSignature has expired")
        rid = credentials.registration_id
        individual = self.enrollments.find(INDIVIDUAL, rid)
        if individual is not None:
            if individual.attestation_type != "symmetricKey" or not individual.keys:
                raise AttestationFailed(f"enrollment {individual.enrollment_id!r} does not use symmetric-key attestation")
            if not self._matches(token, individual.keys):
                raise AttestationFailed("SharedAccessSignature signature does not verify with the enrollment's keys")
            return AttestedIdentity(rid, "symmetricKey", individual, "sas", device_keys=individual.keys,
                                    details={"symmetricKey": {}})
        for group in self.enrollments.list(GROUP, "symmetricKey"):
            if not group.keys:
                continue
            derived = (derive_device_key(group.keys[0], rid), derive_device_key(group.keys[1], rid))
            if self._matches(token, derived):
                return AttestedIdentity(rid, "symmetricKey", group, "sas", device_keys=derived,
                                        details={"symmetricKey": {"enrollmentGroupId": group.enrollment_id}})
        raise AttestationFailed(f"no symmetric-key enrollment or group accepts this signature for {rid!r}")
