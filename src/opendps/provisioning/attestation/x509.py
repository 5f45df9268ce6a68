"""X.509 attestation: the client certificate chain sent in the TLS handshake.

The TLS layer accepts any chain and hands it over (docs/architecture.md, "TLS"); this module
decides. CN must equal the registration id (<= 64 characters). An individual enrollment pins the
device certificate (primary or secondary, by SHA-256). Otherwise the enrollment group of the
nearest CA first decides: the sent intermediates in order, then verified DPS CA certificates that
issued the last one, up to a root. The chain is then path-validated (cryptography's verifier,
RFC 5280) from the leaf to that group's CA as the only trust anchor. A path that validated is remembered
(:class:`opendps.pki.certificates.ValidatedPaths`): the device's next request on the same chain (the MQTT register
after its CONNECT, a poll, a status lookup) re-decides everything but the signature arithmetic.

Enrollments: an individual one pins ``clientCertificates`` (CN = registration id); a group references
verified DPS CA certificates by name (``caReferences``) or gives one inline (``signingCertificates``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from opendps.errors import InvalidInput, NotFound
from opendps.hub import DeviceCredential
from opendps.pki import CaCertificateView, device_chain_verifier, issued_by, load_certificate_text, thumbprint, unreadable
from opendps.pki.certificates import ValidatedPaths, VerificationError
from opendps.provisioning.attestation.mechanism import (
    HTTPS,
    MQTT,
    AttestationFailed,
    AttestedIdentity,
    Context,
    DeviceCredentials,
)
from opendps.provisioning.enrollments import GROUP, INDIVIDUAL, ca_names, certificate_info, json_object

MAX_CN = 64
MAX_DEPTH = 6
CA_NOT_VERIFIED = 400012


# paths validated to a group's CA, the anchor in the key: the MQTT register after its CONNECT, a poll, a status
# lookup redo the trust decision but not the signature arithmetic
VALIDATED = ValidatedPaths()


def check_client_certificate(leaf: x509.Certificate, registration_id: str, now: datetime) -> None:
    """The device certificate itself: identity, validity window and usage for TLS client auth."""
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) != 1:
        raise AttestationFailed("device certificate must have exactly one subject CN (the registration id)",
                                reason="certificate_mismatch")
    if cns[0] != registration_id:
        raise AttestationFailed(f"device certificate CN {cns[0]!r} does not match registration id {registration_id!r}",
                                reason="certificate_mismatch")
    if len(registration_id) > MAX_CN:
        raise AttestationFailed(f"registration id is longer than {MAX_CN} characters, the limit for X.509 attestation")
    if now < leaf.not_valid_before_utc:
        raise AttestationFailed(f"device certificate is not yet valid (notBefore {leaf.not_valid_before_utc.isoformat()})",
                                reason="certificate_expired")
    if now > leaf.not_valid_after_utc:
        raise AttestationFailed(f"device certificate has expired (notAfter {leaf.not_valid_after_utc.isoformat()})",
                                reason="certificate_expired")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise AttestationFailed("device certificate's extended key usage does not allow TLS client authentication")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.digital_signature:
        raise AttestationFailed("device certificate's key usage lacks digitalSignature")


class X509Attestation:
    name = "x509"
    transports = frozenset({HTTPS, MQTT})

    # ---- enrollments ----
    def enrollment(self, kind: str, enrollment_id: str, attestation: dict[str, Any],
                   previous_keys: tuple[str, str] | None, context: Context) -> tuple[dict[str, Any], tuple[str, str] | None]:
        body = json_object(attestation.get("x509"), "attestation.x509")
        if kind == INDIVIDUAL:
            return {"type": self.name, "x509": self._client_certificates(enrollment_id, body)}, None
        return {"type": self.name, "x509": self._ca_references(body, context)}, None

    @staticmethod
    def _client_certificates(enrollment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        certs = json_object(body.get("clientCertificates"), "attestation.x509.clientCertificates")
        out: dict[str, Any] = {}
        for slot in ("primary", "secondary"):
            entry = json_object(certs.get(slot), f"attestation.x509.clientCertificates.{slot}")
            if not entry:
                continue
            cert = load_certificate_text(entry.get("certificate") or "", f"clientCertificates.{slot}.certificate")
            cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
            if cns != [enrollment_id] and (not cns or cns[0].lower() != enrollment_id.lower()):
                raise InvalidInput(f"clientCertificates.{slot} has CN {cns[0] if cns else '(none)'!r}; an individual "
                                   f"X.509 enrollment's certificate CN must equal its registration id {enrollment_id!r}")
            out[slot] = {"certificate": cert.public_bytes(Encoding.PEM).decode(), "info": certificate_info(cert)}
        if "primary" not in out:
            raise InvalidInput("an individual X.509 enrollment needs attestation.x509.clientCertificates.primary")
        return {"clientCertificates": out}

    @staticmethod
    def _ca_references(body: dict[str, Any], context: Context) -> dict[str, Any]:
        refs = json_object(body.get("caReferences"), "attestation.x509.caReferences")
        names = {slot: refs[slot] for slot in ("primary", "secondary") if refs.get(slot)}
        signing = json_object(body.get("signingCertificates"), "attestation.x509.signingCertificates")
        for slot in ("primary", "secondary"):  # an uploaded certificate given inline must be a verified DPS certificate
            entry = json_object(signing.get(slot), f"attestation.x509.signingCertificates.{slot}")
            if entry and slot not in names:
                cert = load_certificate_text(entry.get("certificate") or "", f"signingCertificates.{slot}.certificate")
                found = context.ca_certificates.find_by_thumbprint(thumbprint(cert))
                if found is None:
                    raise InvalidInput(f"signingCertificates.{slot} is not an uploaded DPS CA certificate: upload and "
                                       "verify it (dps certificate create/verify), then reference it with --ca-name")
                names[slot] = found.name
        if "primary" not in names:
            raise InvalidInput("an X.509 enrollment group needs attestation.x509.caReferences.primary (--ca-name)")
        for slot, name in names.items():
            if not isinstance(name, str):
                raise InvalidInput(f"caReferences.{slot} must be a certificate name")
            try:
                view = context.ca_certificates.get(name)
            except NotFound:
                raise InvalidInput(f"CA certificate {name!r} (caReferences.{slot}) does not exist in this DPS") from None
            if not view.is_verified:
                raise InvalidInput(f"CA certificate {name!r} is not verified: prove possession of its key first "
                                   "(dps certificate generate-verification-code / verify)", error_code=CA_NOT_VERIFIED)
        return {"caReferences": names}

    # ---- devices ----
    def presented(self, credentials: DeviceCredentials) -> bool:
        return bool(credentials.client_chain)

    def authenticate(self, credentials: DeviceCredentials, context: Context, *, now: datetime) -> AttestedIdentity:
        chain = list(credentials.client_chain)
        for position, cert in enumerate(chain):
            why = unreadable(cert)
            if why is not None:
                raise AttestationFailed(f"{'device certificate' if position == 0 else f'client chain certificate {position}'}"
                                        f" cannot be read: {why}", reason="untrusted_certificate")
        leaf = chain[0]
        rid = credentials.registration_id
        check_client_certificate(leaf, rid, now)
        info = certificate_info(leaf)
        individual = context.enrollments.lookup(INDIVIDUAL, rid)
        if individual is not None:
            if individual.attestation_type != self.name:
                raise AttestationFailed(f"enrollment {individual.enrollment_id!r} does not use X.509 attestation",
                                        reason="wrong_attestation")
            pinned = individual.document["attestation"]["x509"]["clientCertificates"]
            prints = (pinned["primary"]["info"]["sha256Thumbprint"] if "primary" in pinned else None,
                      pinned["secondary"]["info"]["sha256Thumbprint"] if "secondary" in pinned else None)
            if info["sha256Thumbprint"] not in prints:
                raise AttestationFailed(f"device certificate is not the one enrolled for {individual.enrollment_id!r}",
                                        reason="certificate_mismatch")
            return AttestedIdentity(rid, self.name, individual, DeviceCredential("selfSigned", thumbprints=prints),
                                    details={"x509": {"certificateInfo": info}})
        return self._group(chain, rid, info, context, now)

    def _group(self, chain: list[x509.Certificate], rid: str, info: dict[str, Any], context: Context,
               now: datetime) -> AttestedIdentity:
        verified = context.ca_certificates.verified()
        by_sha: dict[str, list[str]] = {}
        for v in verified:
            by_sha.setdefault(v.sha256, []).append(v.name)
        path = list(chain[1:MAX_DEPTH])
        top = path[-1] if path else chain[0]
        while len(path) < MAX_DEPTH and top.issuer != top.subject:
            parent = _issuer_among(top, verified)
            if parent is None:
                break
            path.append(parent)
            top = parent
        for position, ca in enumerate(path):
            for name in by_sha.get(thumbprint(ca), []):
                groups = [g for g in context.enrollments.lookup_all(GROUP, self.name) if name in ca_names(g.document)]
                if not groups:
                    continue
                group = groups[0]
                self._verify_path(chain[0], chain[1:position + 1], ca, name, now)
                return AttestedIdentity(rid, self.name, group, DeviceCredential("certificateAuthority"), details={"x509": {
                    "certificateInfo": info, "enrollmentGroupId": group.enrollment_id,
                    "signingCertificateInfo": certificate_info(ca)}})
        raise AttestationFailed("device certificate does not chain to a verified CA certificate of any enrollment group, "
                                "and no individual enrollment matches it", reason="untrusted_certificate")

    @staticmethod
    def _verify_path(leaf: x509.Certificate, intermediates: list[x509.Certificate], anchor: x509.Certificate,
                     name: str, now: datetime) -> None:
        path = (leaf, *intermediates, anchor)
        key = VALIDATED.key(path)
        if VALIDATED.get(key, now) is not None:
            return
        try:
            device_chain_verifier([anchor], now).verify(leaf, intermediates)
        except VerificationError as exc:
            raise AttestationFailed(f"device certificate chain does not validate to CA certificate {name!r}: {exc}",
                                    reason="untrusted_certificate") from exc
        VALIDATED.add(key, path)


def _issuer_among(child: x509.Certificate, verified: list[CaCertificateView]) -> x509.Certificate | None:
    """The verified DPS CA certificate that issued ``child``: the only one named as its issuer, or among several of
    that name (a CA renewed with a new key) the one whose key signed it.

    Why not check the signature of the only one: the path is validated before any group is trusted (``_verify_path``,
    signatures included), so checking it here as well was a second signature verification per request (a third and
    fourth over MQTT: at CONNECT and again at the register), ~0.5 ms each with P-384. A namesake that did not sign
    ``child`` fails that validation, as it failed here."""
    named = [v.certificate for v in verified if v.certificate.subject == child.issuer]
    if len(named) == 1:
        return named[0]
    return next((ca for ca in named if issued_by(child, ca)), None)


MECHANISM = X509Attestation()
