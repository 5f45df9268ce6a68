"""Device authentication at the hub (MQTT CONNECT): X.509 chain, self-signed thumbprint, or SAS.

CA-signed devices: the chain must path-validate to a CA the hub trusts (the issuing CAs synced from
linked policies), the leaf CN must be the device id, and a leaf issued by opendps must have been
issued for this device (its ADR record in the issuing policy's namespace) — so a certificate of
another device or another namespace never opens a session, even when its CA is trusted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError
from sqlalchemy import select

from opendps.hub.registry import Hubs, HubView
from opendps.store import DeviceRecord, HubDevice, IssuedCertificate, Policy
from opendps.store import Store as DataStore
from opendps.transport import sas

# MQTT CONNACK return codes
BAD_CREDENTIALS = 4
NOT_AUTHORIZED = 5
IDENTIFIER_REJECTED = 2
_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)


class HubAuthFailed(Exception):
    def __init__(self, message: str, return_code: int = NOT_AUTHORIZED):
        super().__init__(message)
        self.message = message
        self.return_code = return_code


@dataclass(frozen=True)
class AuthenticatedDevice:
    hub_id: int
    hub_name: str
    hub_host: str
    device_id: str
    device_key: str
    auth_type: str
    certificate: x509.Certificate | None = None


def _thumbprints(cert: x509.Certificate) -> set[str]:
    der = cert.public_bytes(Encoding.DER)
    return {hashlib.sha1(der).hexdigest().upper(), hashlib.sha256(der).hexdigest().upper()}  # noqa: S324


class HubAuthenticator:
    def __init__(self, store: DataStore, hubs: Hubs):
        self.store = store
        self.hubs = hubs

    def authenticate(self, hub: HubView, device_id: str, client_id: str, password: bytes | None,
                     chain: list[x509.Certificate], now: datetime) -> AuthenticatedDevice:
        if client_id != device_id:
            raise HubAuthFailed(f"client id {client_id!r} is not the device id {device_id!r} of the username",
                                IDENTIFIER_REJECTED)
        with self.store.session() as s:
            row = s.scalars(select(HubDevice).where(HubDevice.hub_id == hub.id,
                                                    HubDevice.device_key == device_id.lower())).first()
            if row is None:
                raise HubAuthFailed(f"device {device_id!r} does not exist in hub {hub.name!r}")
            if row.status != "enabled":
                raise HubAuthFailed(f"device {device_id!r} is disabled")
            device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, row.device_id, row.device_key, row.auth_type)
            keys = self.hubs.device_keys(hub.id, row) if row.secret is not None else None
            prints = {p for p in (row.primary_thumbprint, row.secondary_thumbprint) if p}
        if password is not None:
            return self._sas(device, password, keys, now)
        if chain:
            return self._x509(device, chain, prints, now)
        raise HubAuthFailed("no credential: send a SAS token as the password or a client certificate", BAD_CREDENTIALS)

    def _sas(self, device: AuthenticatedDevice, password: bytes, keys: tuple[str, str] | None,
             now: datetime) -> AuthenticatedDevice:
        if device.auth_type != "sas" or not keys:
            raise HubAuthFailed(f"device {device.device_id!r} does not use SAS authentication", BAD_CREDENTIALS)
        try:
            token = sas.parse(password.decode("utf-8"))
        except (UnicodeDecodeError, sas.SasError) as exc:
            raise HubAuthFailed(f"invalid SharedAccessSignature: {exc}", BAD_CREDENTIALS) from exc
        expected = f"{device.hub_host}/devices/{device.device_id}"
        if unquote(token.raw_resource).lower() != expected.lower():
            raise HubAuthFailed(f"SharedAccessSignature sr {token.resource!r} does not name {expected!r}", BAD_CREDENTIALS)
        for key in keys:
            try:
                sas.verify(token, key, now=now.timestamp())
                return device
            except sas.SasError as exc:
                if "expired" in str(exc):
                    raise HubAuthFailed("SharedAccessSignature has expired", BAD_CREDENTIALS) from exc
        raise HubAuthFailed("SharedAccessSignature signature does not verify", BAD_CREDENTIALS)

    def _x509(self, device: AuthenticatedDevice, chain: list[x509.Certificate], prints: set[str],
              now: datetime) -> AuthenticatedDevice:
        leaf = chain[0]
        cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [device.device_id]:
            raise HubAuthFailed(f"certificate CN {cns[0] if cns else None!r} is not the device id {device.device_id!r}")
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise HubAuthFailed("device certificate is expired or not yet valid")
        found = replace(device, certificate=leaf)
        if device.auth_type == "selfSigned":
            if not _thumbprints(leaf) & prints:
                raise HubAuthFailed("device certificate thumbprint does not match the device identity")
            return found
        if device.auth_type != "certificateAuthority":
            raise HubAuthFailed(f"device {device.device_id!r} does not use X.509 authentication")
        synced = [t.certificate for t in self.hubs.trusted_cas(device.hub_name, now=now)]
        uploaded = self.hubs.uploaded_cas(device.hub_id, now=now)
        if not synced and not uploaded:
            raise HubAuthFailed(f"hub {device.hub_name!r} trusts no CA")
        verifier = (PolicyBuilder().store(Store(synced + uploaded)).time(now)
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_EE_POLICY)
                    .build_client_verifier())
        try:
            verified = verifier.verify(leaf, chain[1:])
        except VerificationError as exc:
            raise HubAuthFailed(f"device certificate is not issued by a CA this hub trusts: {exc}") from exc
        if verified.chain[-1] not in uploaded:  # an operational certificate of ours: it must be this device's
            self._issued_for_device(device, leaf)
        return found

    def _issued_for_device(self, device: AuthenticatedDevice, leaf: x509.Certificate) -> None:
        sha = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
        with self.store.session() as s:
            issued = s.scalars(select(IssuedCertificate).where(IssuedCertificate.sha256 == sha)).first()
            if issued is None:
                raise HubAuthFailed("device certificate was not issued by this service")
            policy = s.get(Policy, issued.policy_id) if issued.policy_id is not None else None
            record = None
            if policy is not None:
                record = s.scalars(select(DeviceRecord).where(DeviceRecord.namespace_id == policy.namespace_id,
                                                              DeviceRecord.device_key == device.device_key)).first()
            if record is None or record.registration_id.lower() != issued.registration_id.lower():
                raise HubAuthFailed(f"device certificate was issued for {issued.registration_id!r}, not for device "
                                    f"{device.device_id!r}")
