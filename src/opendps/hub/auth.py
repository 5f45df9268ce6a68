"""Device authentication at the hub (MQTT CONNECT): X.509 chain, self-signed thumbprint, or SAS.

CA-signed devices: the chain must path-validate to a CA the hub trusts (the issuing CAs synced from
linked policies, and CAs uploaded to the hub), the leaf CN must be the device id, and a leaf issued by
opendps must have been issued for this device (its ADR record in the issuing policy's namespace) — so a
certificate of another device or another namespace never opens a session, even when its CA is trusted.

Refusals are :mod:`opendps.errors` kinds; the MQTT front end maps them to CONNACK codes (InvalidInput:
identifier rejected, InvalidCredentials: bad user name or password, other 4xx: not authorized).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from urllib.parse import unquote

from cryptography import x509
from cryptography.x509.oid import NameOID

from opendps.errors import InvalidCredentials, InvalidInput, Unauthorized
from opendps.hub.registry import Hubs, HubView
from opendps.pki import IssuanceEngine, device_chain_verifier, thumbprint
from opendps.pki.certificates import VerificationError
from opendps.registry import DeviceRegistry
from opendps.transport import sas


@dataclass(frozen=True)
class AuthenticatedDevice:
    hub_id: int
    hub_name: str
    hub_host: str
    device_id: str
    device_key: str
    auth_type: str
    certificate: x509.Certificate | None = None


class HubAuthenticator:
    """Decides whether a CONNECT may open a device session; the front end only translates."""

    def __init__(self, hubs: Hubs, issuance: IssuanceEngine, devices: DeviceRegistry) -> None:
        self.hubs = hubs
        self.issuance = issuance
        self.devices = devices

    def authenticate(self, hub: HubView, device_id: str, client_id: str, password: bytes | None,
                     chain: list[x509.Certificate], now: datetime) -> AuthenticatedDevice:
        if client_id != device_id:
            raise InvalidInput(f"client id {client_id!r} is not the device id {device_id!r} of the username")
        found = self.hubs.identity(hub, device_id)
        if found is None:
            raise Unauthorized(f"device {device_id!r} does not exist in hub {hub.name!r}")
        identity, keys = found
        if identity.status != "enabled":
            raise Unauthorized(f"device {device_id!r} is disabled")
        device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, identity.device_id, identity.device_id.lower(),
                                     identity.auth_type)
        if password is not None:
            return self._sas(device, password, keys, now)
        if chain:
            prints = {p for p in (identity.primary_thumbprint, identity.secondary_thumbprint) if p}
            return self._x509(hub, device, chain, prints, now)
        raise InvalidCredentials("no credential: send a SAS token as the password or a client certificate")

    @staticmethod
    def _sas(device: AuthenticatedDevice, password: bytes, keys: tuple[str, str] | None,
             now: datetime) -> AuthenticatedDevice:
        if device.auth_type != "sas" or not keys:
            raise InvalidCredentials(f"device {device.device_id!r} does not use SAS authentication")
        try:
            token = sas.parse(password.decode("utf-8"))
        except (UnicodeDecodeError, sas.SasError) as exc:
            raise InvalidCredentials(f"invalid SharedAccessSignature: {exc}") from exc
        expected = f"{device.hub_host}/devices/{device.device_id}"
        if unquote(token.raw_resource).lower() != expected.lower():
            raise InvalidCredentials(f"SharedAccessSignature sr {token.resource!r} does not name {expected!r}")
        for key in keys:
            try:
                sas.verify(token, key, now=now.timestamp())
                return device
            except sas.SasError as exc:
                if "expired" in str(exc):
                    raise InvalidCredentials("SharedAccessSignature has expired") from exc
        raise InvalidCredentials("SharedAccessSignature signature does not verify")

    def _x509(self, hub: HubView, device: AuthenticatedDevice, chain: list[x509.Certificate], prints: set[str],
              now: datetime) -> AuthenticatedDevice:
        leaf = chain[0]
        cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [device.device_id]:
            raise Unauthorized(f"certificate CN {cns[0] if cns else None!r} is not the device id {device.device_id!r}")
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise Unauthorized("device certificate is expired or not yet valid")
        found = replace(device, certificate=leaf)
        if device.auth_type == "selfSigned":
            if not {thumbprint(leaf, "sha1"), thumbprint(leaf)} & prints:
                raise Unauthorized("device certificate thumbprint does not match the device identity")
            return found
        if device.auth_type != "certificateAuthority":
            raise Unauthorized(f"device {device.device_id!r} does not use X.509 authentication")
        synced = [t.certificate for t in self.hubs.trusted_cas(hub, now=now)]
        uploaded = self.hubs.uploaded_cas(hub, now=now)
        if not synced and not uploaded:
            raise Unauthorized(f"hub {hub.name!r} trusts no CA")
        try:
            verified = device_chain_verifier(synced + uploaded, now).verify(leaf, chain[1:])
        except VerificationError as exc:
            raise Unauthorized(f"device certificate is not issued by a CA this hub trusts: {exc}") from exc
        if verified.chain[-1] not in uploaded:  # an operational certificate of ours: it must be this device's
            self._issued_for_device(device, leaf)
        return found

    def _issued_for_device(self, device: AuthenticatedDevice, leaf: x509.Certificate) -> None:
        issued = self.issuance.find(leaf)
        if issued is None:
            raise Unauthorized("device certificate was not issued by this service")
        holder = self.devices.registration_id(issued.policy_id, device.device_id) if issued.policy_id else None
        if holder is None or holder.lower() != issued.registration_id.lower():
            raise Unauthorized(f"device certificate was issued for {issued.registration_id!r}, not for device "
                               f"{device.device_id!r}")
