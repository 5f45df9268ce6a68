"""Device authentication at the hub (MQTT CONNECT): X.509 chain, self-signed thumbprint, or SAS.

CA-signed devices: the leaf must be one opendps issued (its issuance record, by the DER's SHA-256) under an
issuing CA the hub trusts (synced from linked policies), or its chain must path-validate to a CA the hub trusts
(synced, or uploaded to the hub); the leaf CN must be the device id, and a leaf issued by opendps must have been
issued for this device (its ADR record in the issuing policy's namespace) — so a certificate of another device
or another namespace never opens a session, even when its CA is trusted.

SAS devices: a token over ``{hubHost}/devices/{deviceId}`` signed with one of the identity's keys and no ``skn``, or
(IoT Hub's token services) with one of the hub's ``iothubowner`` keys and ``skn=iothubowner``; se + 300 s of clock skew
bounds the CONNECT and, through :attr:`AuthenticatedDevice.sas_expiry`, the session (the front end closes it then).

Refusals are :mod:`opendps.errors` kinds; the MQTT front end maps them to CONNACK codes (InvalidInput:
identifier rejected, InvalidCredentials: bad user name or password, other 4xx: not authorized).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.x509.oid import NameOID

from opendps.errors import InvalidCredentials, InvalidInput, Unauthorized
from opendps.hub.registry import Hubs, HubView
from opendps.pki import IssuanceEngine, IssuedRecord, thumbprint
from opendps.pki.certificates import VerificationError, authority_key_id, serial_hex, unreadable
from opendps.registry import DeviceRegistry
from opendps.transport import sas, shown


def device_key(device_id: str) -> str:
    """A device id as the hub keys it (lower-cased), as the same string object when it already is: a live session
    keeps it for days, once."""
    key = device_id.lower()
    return device_id if key == device_id else key


@dataclass(frozen=True, slots=True)
class AuthenticatedDevice:
    hub_id: int
    hub_name: str
    hub_host: str
    device_id: str
    device_key: str
    auth_type: str
    # the X.509 certificate it connected with, as live sessions match revocations (serial upper-case hex, the
    # issuer's key identifier lower-case hex); the parsed certificate itself is not kept: a session lives for days
    certificate_serial: str | None = None
    issuer_key_id: str | None = None
    # serial numbers this CONNECT revoked as superseded (the device's first session with a renewed certificate):
    # the front end drops live sessions still holding them, on every node
    superseded: tuple[str, ...] = ()
    # the filters its last clean-session-0 session held (frontends.mqtt.hub.KEPT_FILTERS), as read at this CONNECT
    subscriptions: int = 0
    # a SAS session: its token's ``se`` (unix seconds, any integer). IoT Hub closes the connection when the token
    # expires ("401003 IoTHubUnauthorized", and some SDKs renew only then); the front end does so at se + the skew the
    # CONNECT check allows (:meth:`HubAuthenticator.valid_until`)
    sas_expiry: int | None = None


# each hub's shared access policy (Hubs.owner_keys): its tokens may connect any of its devices (IoT Hub: a policy with
# DeviceConnect; its iothubowner has every permission); the name is reserved among the DPS access policies too
OWNER_POLICY = "iothubowner"


class HubAuthenticator:
    """Decides whether a CONNECT may open a device session; the front end only translates.

    One step per CONNECT (:meth:`connect`): the hub and what it trusts come from the configuration cache (one read
    of the configuration counter), then at most three prepared statements in one transaction on the driver itself:
    the identity, and for one of our certificates, its issuance record and the device's ADR record; it writes
    nothing but at a renewed certificate's first CONNECT. Nothing it does grows with the number of enrollments,
    devices or hubs.
    """

    def __init__(self, hubs: Hubs, issuance: IssuanceEngine, devices: DeviceRegistry) -> None:
        self.hubs = hubs
        self.issuance = issuance
        self.devices = devices

    def connect(self, host: str, device_id: str, client_id: str, password: bytes | None,
                chain: list[x509.Certificate], now: datetime) -> AuthenticatedDevice:
        """A CONNECT to the hub named by ``host`` (the user name's first part)."""
        store = self.hubs.store
        # the counter and the statements: one connection, the driver's own (see opendps.store.prepared), each statement
        # committing on its own (reads, and at most the one UPDATE of claim_first_use: no BEGIN/COMMIT round trips)
        with store.autocommitted() as conn, store.config_snapshot(conn):
            hub = self.hubs.by_host(host)
            if hub is None:
                raise Unauthorized(f"no linked hub has the host name {host!r}", reason="unknown_hub")
            device, superseding = self._check(conn.cursor(), hub, device_id, client_id, password, chain, now)
        return self._first_use(device, superseding, now)

    def authenticate(self, hub: HubView, device_id: str, client_id: str, password: bytes | None,
                     chain: list[x509.Certificate], now: datetime) -> AuthenticatedDevice:
        """A CONNECT to ``hub``, found already."""
        with self.hubs.store.autocommitted() as conn:
            device, superseding = self._check(conn.cursor(), hub, device_id, client_id, password, chain, now)
        return self._first_use(device, superseding, now)

    def _check(self, cursor: Any, hub: HubView, device_id: str, client_id: str, password: bytes | None,
               chain: list[x509.Certificate], now: datetime) -> tuple[AuthenticatedDevice, IssuedRecord | None]:
        """The device, and the record of its certificate when its first use may revoke older ones (after this
        transaction, in one of its own: :meth:`IssuanceEngine.first_use`)."""
        if client_id != device_id:
            raise InvalidInput(f"client id {shown(client_id)} is not the device id {shown(device_id)} of the username",
                               reason="client_id_mismatch")
        identity = self.hubs.connect_identity(cursor, hub, device_id)
        if identity is None:
            raise Unauthorized(f"device {device_id!r} does not exist in hub {hub.name!r}", reason="unknown_device")
        if identity.status != "enabled":
            raise Unauthorized(f"device {device_id!r} is disabled", reason="device_disabled")
        device = AuthenticatedDevice(hub.id, hub.name, hub.host_name, identity.device_id,
                                     device_key(identity.device_id), sys.intern(identity.auth_type),
                                     subscriptions=identity.subscriptions)
        if password is not None:
            return self._sas(hub, device, password, identity.keys, now), None
        if chain:
            return self._x509(cursor, hub, device, chain, identity.thumbprints, now)
        raise InvalidCredentials("no credential: send a SAS token as the password or a client certificate",
                                 reason="no_credential")

    def _first_use(self, device: AuthenticatedDevice, superseding: IssuedRecord | None,
                   now: datetime) -> AuthenticatedDevice:
        if superseding is None:
            return device
        revoked = self.issuance.first_use(superseding, now=now)
        return replace(device, superseded=tuple(v.serial_number for v in revoked)) if revoked else device

    @staticmethod
    def valid_until(device: AuthenticatedDevice) -> int | None:
        """Until when (unix seconds) a SAS session's token stands: its ``se`` plus the clock skew the CONNECT check
        allows, so a session lasts exactly as long as its password would still open one. None: not a SAS session."""
        return None if device.sas_expiry is None else device.sas_expiry + sas.DEFAULT_SKEW_SECONDS

    def _sas(self, hub: HubView, device: AuthenticatedDevice, password: bytes, keys: tuple[str, str] | None,
             now: datetime) -> AuthenticatedDevice:
        """A SAS password: a device token (no ``skn``: signed with one of the identity's keys) or, as IoT Hub's token
        services mint them, a token of the hub's shared access policy (``skn=iothubowner``, signed with one of its
        keys: the DeviceConnect permission). Any other ``skn`` names a policy the hub does not have: refused, as IoT
        Hub refuses it, rather than checked against the device's keys."""
        try:
            token = sas.parse(password.decode("utf-8"))
        except (UnicodeDecodeError, sas.SasError) as exc:
            raise InvalidCredentials(f"invalid SharedAccessSignature: {exc}", reason="sas_invalid") from exc
        if token.key_name:
            if token.key_name != OWNER_POLICY:
                raise InvalidCredentials(f"SharedAccessSignature skn {shown(token.key_name)} is not a shared access "
                                         f"policy of hub {hub.name!r} with DeviceConnect: a device token has no skn, "
                                         f"a policy token names {OWNER_POLICY}", reason="sas_invalid")
            keys = self.hubs.owner_keys(hub.name)
        elif device.auth_type not in ("sas", "certificateAuthority") or not keys:
            # SAS devices, and certificate devices that also hold a key (a TPM device given an operational certificate)
            raise InvalidCredentials(f"device {device.device_id!r} does not use SAS authentication",
                                     reason="wrong_auth_type")
        expected = f"{device.hub_host}/devices/{device.device_id}"
        if unquote(token.raw_resource).lower() != expected.lower():
            raise InvalidCredentials(f"SharedAccessSignature sr {token.resource!r} does not name {expected!r}",
                                     reason="sas_invalid")
        for key in keys:
            try:
                sas.verify(token, key, now=now.timestamp())
                return replace(device, sas_expiry=token.expiry)
            except sas.SasError as exc:
                if "expired" in str(exc):
                    raise InvalidCredentials("SharedAccessSignature has expired", reason="sas_expired") from exc
        raise InvalidCredentials("SharedAccessSignature signature does not verify", reason="sas_invalid")

    def _x509(self, cursor: Any, hub: HubView, device: AuthenticatedDevice, chain: list[x509.Certificate],
              prints: frozenset[str], now: datetime) -> tuple[AuthenticatedDevice, IssuedRecord | None]:
        leaf = chain[0]
        why = unreadable(leaf, key=False)  # the CA certificates after it only meet the verifier (its own errors)
        if why is not None:
            raise Unauthorized(f"device certificate cannot be read: {why}", reason="untrusted_certificate")
        cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [device.device_id]:
            raise Unauthorized(f"certificate CN {cns[0] if cns else None!r} is not the device id {device.device_id!r}",
                               reason="certificate_mismatch")
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise Unauthorized("device certificate is expired or not yet valid", reason="certificate_expired")
        issuer = authority_key_id(leaf)
        # the issuer's key id is the same for a CA's whole fleet: one string (interned: it lives while a session
        # holds it) per process, not per live session
        found = replace(device, certificate_serial=serial_hex(leaf),
                        issuer_key_id=sys.intern(issuer) if issuer is not None else None)
        if device.auth_type == "selfSigned":
            if not {thumbprint(leaf, "sha1"), thumbprint(leaf)} & prints:
                raise Unauthorized("device certificate thumbprint does not match the device identity",
                                   reason="certificate_mismatch")
            return found, None
        if device.auth_type != "certificateAuthority":
            raise Unauthorized(f"device {device.device_id!r} does not use X.509 authentication", reason="wrong_auth_type")
        trust = self.hubs.trust(hub)
        # One of our operational certificates is recognised by its issuance record (the same DER, by SHA-256) under
        # an issuing CA this hub trusts: its signature needs no check (we made these very bytes, and the TLS
        # handshake proved the device holds its key), so the chain is not path-validated again (a P-384 signature,
        # the larger part of a CONNECT's own CPU). Everything else goes through the verifier.
        looked_up = trust.issuing_ca(issuer, now) is not None
        issued = self.issuance.find(cursor, leaf) if looked_up else None
        if issued is None:
            try:
                anchor = trust.validate(leaf, chain[1:], now)
            except VerificationError as exc:
                raise Unauthorized(f"device certificate is not issued by a CA this hub trusts: {exc}",
                                   reason="untrusted_certificate") from exc
            if anchor is None:
                raise Unauthorized(f"hub {hub.name!r} trusts no CA", reason="untrusted_certificate")
            if trust.is_uploaded(anchor):  # the owner's CA: no record of ours to check
                return found, None
            if not looked_up:
                issued = self.issuance.find(cursor, leaf)
        return found, self._issued_for_device(cursor, device, issued, now)  # ours: it must be this device's

    def no_longer_allowed(self, sessions: list[AuthenticatedDevice]) -> list[tuple[AuthenticatedDevice, str]]:
        """Of live ``sessions``, those CONNECT would refuse now, with why: the device deleted or disabled, or its
        certificate (one of ours) revoked. Why: the drop or revocation told to every node is a live message, lost
        when the bus was away; the bus back, each node asks this of its sessions (two statements per hub)."""
        enabled = self.hubs.enabled([(d.hub_id, d.device_key.lower()) for d in sessions])
        revoked = self.issuance.revoked_among([d.certificate_serial for d in sessions if d.certificate_serial])
        refused: list[tuple[AuthenticatedDevice, str]] = []
        for d in sessions:
            if (d.hub_id, d.device_key.lower()) not in enabled:
                refused.append((d, "disabled or deleted by the service while the live bus was away"))
            elif d.certificate_serial in revoked:
                refused.append((d, f"certificate {d.certificate_serial} was revoked while the live bus was away"))
        return refused

    def _issued_for_device(self, cursor: Any, device: AuthenticatedDevice, issued: IssuedRecord | None,
                           now: datetime) -> IssuedRecord | None:
        """Refuse a certificate we did not issue (no ``issued`` record) to this device or that is revoked. At the first
        CONNECT of a renewed certificate (older unrevoked ones of its registration exist), return its record when the
        policy revokes those it supersedes (the caller does it in a transaction of its own), else note the use."""
        if issued is None:
            raise Unauthorized("device certificate was not issued by this service", reason="untrusted_certificate")
        if issued.revoked_at is not None:
            raise Unauthorized(f"device certificate {issued.serial_number} is revoked ({issued.revocation_reason})",
                               reason="certificate_revoked")
        holder = self.devices.registration_id(cursor, issued.policy_id, device.device_id) if issued.policy_id \
            else None
        if holder is None or holder.lower() != issued.registration_id.lower():
            raise Unauthorized(f"device certificate was issued for {issued.registration_id!r}, not for device "
                               f"{device.device_id!r}", reason="certificate_mismatch")
        # no write: every CONNECT after the first, and every one of a certificate with nothing older to supersede
        # (the record's read says so; none can appear: one issued later is newer, and a revocation is never undone)
        if issued.first_used_at is not None or issued.policy_id is None or not issued.has_older:
            return None
        if self.hubs.registry.issuer(issued.policy_id).revoke_superseded:
            return issued  # revoked in a transaction of its own, after this one
        self.issuance.claim_first_use(cursor, issued, now)  # kept: turning revokeSuperseded on later revokes nothing
        return None
