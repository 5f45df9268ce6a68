"""Individual enrollments and enrollment groups, in the shapes of Azure's DPS service API.

The stored ``document`` is the normalised Azure document without symmetric keys; keys are wrapped
by the master key in ``secret``. PUT without If-Match upserts (what Azure's SDKs expect, see the
wire spec §5.3); with If-Match the etag must match.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from sqlalchemy import delete, func, select

from opendps.errors import InvalidInput, NotFound, PreconditionFailed
from opendps.ids import etag_matches, new_etag
from opendps.pki.keys import KeyStore
from opendps.provisioning.ca_certificates import load_certificate_text
from opendps.store import DpsCertificate, Enrollment, LinkedHub, Namespace, Policy, Registration, Store

INDIVIDUAL = "individual"
GROUP = "group"
ATTESTATION_TYPES = ("x509", "symmetricKey")
ALLOCATION_POLICIES = ("hashed", "geoLatency", "static", "custom")
# Azure registration ids: alphanumerics and - . _ : ; last character alphanumeric or '-'; case-insensitive
REGISTRATION_ID = re.compile(r"^[A-Za-z0-9\-._:]{0,127}[A-Za-z0-9\-]$")
MAX_KEY_BYTES = 64


def check_registration_id(value: object, what: str = "registration id") -> str:
    if not isinstance(value, str) or not REGISTRATION_ID.match(value):
        raise InvalidInput(f"{what} {value!r} is invalid: use 1-128 characters from a-z, A-Z, 0-9, '-', '.', '_', ':' "
                           "ending with a letter, digit or '-'")
    return value


def derive_device_key(group_key: str, registration_id: str) -> str:
    """Device key of a symmetric-key group member: base64(HMAC-SHA256(b64decode(group key), registration id))."""
    return base64.b64encode(hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()).decode()


def certificate_info(cert: x509.Certificate) -> dict[str, Any]:
    """``X509CertificateInfo`` as Azure shows it."""
    der = cert.public_bytes(Encoding.DER)
    return {
        "subjectName": cert.subject.rfc4514_string(),
        "sha1Thumbprint": hashlib.sha1(der).hexdigest().upper(),  # noqa: S324 - a thumbprint, as Azure shows it
        "sha256Thumbprint": hashlib.sha256(der).hexdigest().upper(),
        "issuerName": cert.issuer.rfc4514_string(),
        "notBeforeUtc": cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "notAfterUtc": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "serialNumber": format(cert.serial_number, "X"),
        "version": cert.version.value + 1,
    }


@dataclass(frozen=True)
class EnrollmentView:
    kind: str
    enrollment_id: str
    attestation_type: str
    document: dict  # normalised, without keys
    keys: tuple[str, str] | None
    policy_id: int | None
    etag: str
    created_at: datetime
    updated_at: datetime

    @property
    def enabled(self) -> bool:
        return self.document.get("provisioningStatus", "enabled") == "enabled"

    def to_wire(self, *, include_keys: bool = False) -> dict[str, Any]:
        doc = json.loads(json.dumps(self.document))
        if include_keys and self.keys:
            doc["attestation"]["symmetricKey"] = {"primaryKey": self.keys[0], "secondaryKey": self.keys[1]}
        doc["etag"] = self.etag
        doc["createdDateTimeUtc"] = _iso(self.created_at)
        doc["lastUpdatedDateTimeUtc"] = _iso(self.updated_at)
        return doc

    def attestation_mechanism(self) -> dict[str, Any]:
        return self.to_wire(include_keys=True)["attestation"]


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _obj(value: object, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    return value


def _bool(value: object, where: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"{where} must be true or false")
    return value


def _key(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{where} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{where} is not valid base64") from exc
    if not 16 <= len(raw) <= MAX_KEY_BYTES:
        raise InvalidInput(f"{where} must decode to 16-{MAX_KEY_BYTES} bytes (got {len(raw)})")
    return value


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(MAX_KEY_BYTES)).decode()


class Enrollments:
    def __init__(self, store: Store, keys: KeyStore):
        self.store = store
        self.keys = keys

    # ---- reading ----
    def _view(self, row: Enrollment) -> EnrollmentView:
        keys = None
        if row.secret is not None:
            keys = tuple(json.loads(self.keys.unwrap(row.secret, self._label(row.kind, row.enrollment_id))))
        return EnrollmentView(row.kind, row.enrollment_id, row.attestation_type, row.document, keys, row.policy_id,
                              row.etag, row.created_at, row.updated_at)

    @staticmethod
    def _label(kind: str, enrollment_id: str) -> str:
        return f"enrollment:{kind}:{enrollment_id.lower()}"

    @staticmethod
    def _row(s, kind: str, enrollment_id: str) -> Enrollment | None:  # noqa: ANN001
        return s.scalars(select(Enrollment).where(Enrollment.kind == kind,
                                                  func.lower(Enrollment.enrollment_id) == enrollment_id.lower())).first()

    def get(self, kind: str, enrollment_id: str) -> EnrollmentView:
        with self.store.session() as s:
            row = self._row(s, kind, enrollment_id)
            if row is None:
                what = "enrollment group" if kind == GROUP else "enrollment"
                raise NotFound(f"{what} {enrollment_id!r} does not exist", error_code=404201)
            return self._view(row)

    def find(self, kind: str, enrollment_id: str) -> EnrollmentView | None:
        with self.store.session() as s:
            row = self._row(s, kind, enrollment_id)
            return self._view(row) if row else None

    def list(self, kind: str, attestation_type: str | None = None) -> list[EnrollmentView]:
        """Enrollments of ``kind`` in creation order; ``attestation_type`` filters in SQL (attestation hot paths
        must not unwrap the keys of groups they cannot match)."""
        q = select(Enrollment).where(Enrollment.kind == kind)
        if attestation_type is not None:
            q = q.where(Enrollment.attestation_type == attestation_type)
        with self.store.session() as s:
            return [self._view(r) for r in s.scalars(q.order_by(Enrollment.id))]

    def groups_on_certificate(self, dps_certificate_name: str) -> list[EnrollmentView]:
        """X.509 groups that reference ``dps_certificate_name`` (caReferences)."""
        return [v for v in self.list(GROUP, "x509") if dps_certificate_name in _ca_names(v.document)]

    # ---- writing ----
    def put(self, kind: str, enrollment_id: str, document: dict, *, if_match: str | None = None) -> tuple[EnrollmentView, bool]:
        """Create or replace; returns (view, created)."""
        check_registration_id(enrollment_id, "enrollment group id" if kind == GROUP else "registration id")
        if not isinstance(document, dict):
            raise InvalidInput("request body must be a JSON object")
        now = datetime.now(UTC)
        with self.store.session() as s:
            row = self._row(s, kind, enrollment_id)
            if row is None and if_match not in (None, "*"):
                raise PreconditionFailed(f"enrollment {enrollment_id!r} does not exist, so If-Match cannot match")
            if row is not None and not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match enrollment {enrollment_id!r}, as per RFC7232")
            old_keys = self._view(row).keys if row is not None else None
            doc, att_type, keys, policy_id = self._normalise(s, kind, enrollment_id, document, old_keys)
            created = row is None
            if row is None:
                row = Enrollment(kind=kind, enrollment_id=enrollment_id, created_at=now)
                s.add(row)
            row.attestation_type = att_type
            row.policy_id = policy_id
            row.provisioning_status = doc["provisioningStatus"]
            row.document = doc
            row.secret = self.keys.wrap(json.dumps(list(keys)).encode(), self._label(kind, enrollment_id)) if keys else None
            row.etag = new_etag()
            row.updated_at = now
            s.flush()
            return self._view(row), created

    def delete(self, kind: str, enrollment_id: str, *, if_match: str | None = None) -> None:
        with self.store.session() as s:
            row = self._row(s, kind, enrollment_id)
            if row is None:
                raise NotFound(f"enrollment {enrollment_id!r} does not exist", error_code=404201)
            if not etag_matches(if_match, row.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match enrollment {enrollment_id!r}, as per RFC7232")
            if kind == INDIVIDUAL:  # its registration state goes with it, as in Azure
                s.execute(delete(Registration).where(Registration.registration_key == enrollment_id.lower(),
                                                     Registration.enrollment_kind == INDIVIDUAL))
            s.delete(row)

    # ---- validation ----
    def _normalise(self, s, kind: str, enrollment_id: str, body: dict,  # noqa: ANN001, C901
                   old_keys: tuple[str, str] | None) -> tuple[dict, str, tuple[str, str] | None, int | None]:
        id_field = "enrollmentGroupId" if kind == GROUP else "registrationId"
        given = body.get(id_field)
        if given is not None and str(given).lower() != enrollment_id.lower():
            raise InvalidInput(f"{id_field} {given!r} in the body does not match {enrollment_id!r} in the path")
        doc: dict[str, Any] = {id_field: enrollment_id}
        if kind == INDIVIDUAL:
            device_id = body.get("deviceId")
            if device_id is not None:
                doc["deviceId"] = check_registration_id(device_id, "deviceId")
        att = _obj(body.get("attestation"), "attestation")
        att_type = att.get("type")
        if att_type == "tpm":
            raise InvalidInput("attestation type 'tpm' is not supported yet; use 'x509' or 'symmetricKey'")
        if att_type not in ATTESTATION_TYPES:
            raise InvalidInput(f"attestation.type must be one of {', '.join(ATTESTATION_TYPES)} (got {att_type!r})")
        keys = None
        if att_type == "symmetricKey":
            sk = _obj(att.get("symmetricKey"), "attestation.symmetricKey")
            primary, secondary = sk.get("primaryKey"), sk.get("secondaryKey")
            if primary is None and secondary is None and old_keys:
                keys = old_keys
            else:
                keys = (_key(primary, "attestation.symmetricKey.primaryKey") if primary is not None else _new_key(),
                        _key(secondary, "attestation.symmetricKey.secondaryKey") if secondary is not None else _new_key())
            doc["attestation"] = {"type": "symmetricKey", "symmetricKey": {}}
        else:
            doc["attestation"] = {"type": "x509", "x509": self._x509(s, kind, enrollment_id, _obj(att.get("x509"),
                                                                                                  "attestation.x509"))}
        status = body.get("provisioningStatus", "enabled")
        if status not in ("enabled", "disabled"):
            raise InvalidInput(f"provisioningStatus must be 'enabled' or 'disabled' (got {status!r})")
        doc["provisioningStatus"] = status
        policy_id = self._policy(s, body, doc)
        self._allocation(s, body, doc)
        rp = _obj(body.get("reprovisionPolicy"), "reprovisionPolicy")
        doc["reprovisionPolicy"] = {
            "updateHubAssignment": _bool(rp.get("updateHubAssignment"), "reprovisionPolicy.updateHubAssignment", True),
            "migrateDeviceData": _bool(rp.get("migrateDeviceData"), "reprovisionPolicy.migrateDeviceData", True)}
        twin = _obj(body.get("initialTwin"), "initialTwin")
        if twin:
            tags = _obj(twin.get("tags"), "initialTwin.tags")
            desired = _obj(_obj(twin.get("properties"), "initialTwin.properties").get("desired"),
                           "initialTwin.properties.desired")
            doc["initialTwin"] = {"tags": tags, "properties": {"desired": desired}}
        caps = _obj(body.get("capabilities"), "capabilities")
        doc["capabilities"] = {"iotEdge": _bool(caps.get("iotEdge"), "capabilities.iotEdge", False)}
        if kind == INDIVIDUAL and body.get("optionalDeviceInformation") is not None:
            doc["optionalDeviceInformation"] = _obj(body["optionalDeviceInformation"], "optionalDeviceInformation")
        return doc, att_type, keys, policy_id

    def _x509(self, s, kind: str, enrollment_id: str, x: dict) -> dict:  # noqa: ANN001
        if kind == INDIVIDUAL:
            certs = _obj(x.get("clientCertificates"), "attestation.x509.clientCertificates")
            out: dict[str, Any] = {}
            for slot in ("primary", "secondary"):
                entry = _obj(certs.get(slot), f"attestation.x509.clientCertificates.{slot}")
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
        refs = _obj(x.get("caReferences"), "attestation.x509.caReferences")
        names = {slot: refs[slot] for slot in ("primary", "secondary") if refs.get(slot)}
        signing = _obj(x.get("signingCertificates"), "attestation.x509.signingCertificates")
        for slot in ("primary", "secondary"):  # an uploaded certificate given inline must be a verified DPS certificate
            entry = _obj(signing.get(slot), f"attestation.x509.signingCertificates.{slot}")
            if entry and slot not in names:
                cert = load_certificate_text(entry.get("certificate") or "", f"signingCertificates.{slot}.certificate")
                sha = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
                row = s.scalars(select(DpsCertificate).where(DpsCertificate.sha256 == sha)).first()
                if row is None:
                    raise InvalidInput(f"signingCertificates.{slot} is not an uploaded DPS CA certificate: upload and "
                                       "verify it (dps certificate create/verify), then reference it with --ca-name")
                names[slot] = row.name
        if "primary" not in names:
            raise InvalidInput("an X.509 enrollment group needs attestation.x509.caReferences.primary (--ca-name)")
        for slot, name in names.items():
            if not isinstance(name, str):
                raise InvalidInput(f"caReferences.{slot} must be a certificate name")
            row = s.get(DpsCertificate, name)
            if row is None:
                raise InvalidInput(f"CA certificate {name!r} (caReferences.{slot}) does not exist in this DPS")
            if not row.is_verified:
                raise InvalidInput(f"CA certificate {name!r} is not verified: prove possession of its key first "
                                   "(dps certificate generate-verification-code / verify)", error_code=400012)
        return {"caReferences": names}

    @staticmethod
    def _policy(s, body: dict, doc: dict) -> int | None:  # noqa: ANN001
        name = body.get("credentialPolicyName")
        namespace = body.get("namespaceName")
        post_preview = body.get("certificatePolicyName"), body.get("certificateAuthorityName")
        if any(v is not None for v in post_preview):  # the 2026 triple; a partial reference is rejected
            if None in (*post_preview, namespace):
                raise InvalidInput("namespaceName, certificateAuthorityName and certificatePolicyName go together; "
                                   "a partial reference is rejected")
            if name is not None and name != post_preview[0]:
                raise InvalidInput("credentialPolicyName and certificatePolicyName name different policies")
            if post_preview[1] != post_preview[0]:
                raise InvalidInput(f"certificateAuthorityName {post_preview[1]!r} is not the issuing CA of policy "
                                   f"{post_preview[0]!r} (each policy owns one issuing CA of the same name)")
            name = post_preview[0]
        if name is None:
            return None
        if not isinstance(name, str) or not name:
            raise InvalidInput("credentialPolicyName must be a policy name")
        q = select(Policy, Namespace.name).join(Namespace, Policy.namespace_id == Namespace.id).where(Policy.name == name)
        if namespace is not None:
            q = q.where(Namespace.name == namespace)
        rows = s.execute(q).all()
        if not rows:
            where = f" in namespace {namespace!r}" if namespace else ""
            raise InvalidInput(f"credential policy {name!r}{where} does not exist")
        if len(rows) > 1:
            raise InvalidInput(f"credential policy {name!r} exists in several namespaces "
                               f"({', '.join(sorted(n for _, n in rows))}); also give namespaceName")
        policy, ns = rows[0]
        doc["credentialPolicyName"] = name
        doc["namespaceName"] = ns
        return policy.id

    @staticmethod
    def _allocation(s, body: dict, doc: dict) -> None:  # noqa: ANN001
        hubs = body.get("iotHubs")
        if hubs is None and body.get("iotHubHostName"):
            hubs = [body["iotHubHostName"]]
        hubs = hubs or []
        if not isinstance(hubs, list) or not all(isinstance(h, str) for h in hubs):
            raise InvalidInput("iotHubs must be a list of hub host names")
        linked = {h.host_name: h.host_name for h in s.scalars(select(LinkedHub))}
        linked_names = {h.name: h.host_name for h in s.scalars(select(LinkedHub))}
        resolved = []
        for h in hubs:
            host = linked.get(h.lower()) or linked_names.get(h)
            if host is None:
                raise InvalidInput(f"iotHubs: {h!r} is not a linked hub (dps linked-hub list)")
            if host not in resolved:
                resolved.append(host)
        policy = body.get("allocationPolicy") or "hashed"
        if policy not in ALLOCATION_POLICIES:
            raise InvalidInput(f"allocationPolicy must be one of {', '.join(ALLOCATION_POLICIES)} (got {policy!r})")
        if policy == "static" and len(resolved) != 1:
            raise InvalidInput("allocationPolicy 'static' needs exactly one hub in iotHubs")
        doc["allocationPolicy"] = policy
        doc["iotHubs"] = resolved
        if policy == "custom":
            cad = _obj(body.get("customAllocationDefinition"), "customAllocationDefinition")
            url = cad.get("webhookUrl")
            parsed = urlparse(url) if isinstance(url, str) else None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise InvalidInput("allocationPolicy 'custom' needs customAllocationDefinition.webhookUrl (an http(s) URL)")
            api_version = cad.get("apiVersion") or "2019-03-31"
            doc["customAllocationDefinition"] = {"webhookUrl": url, "apiVersion": str(api_version)}
            timeout = cad.get("timeoutInSeconds")  # opendps extension; Azure's own limit is not configurable
            if timeout is not None:
                if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= 60:
                    raise InvalidInput("customAllocationDefinition.timeoutInSeconds must be a number from 1 to 60")
                doc["customAllocationDefinition"]["timeoutInSeconds"] = timeout


def _ca_names(document: dict) -> list[str]:
    refs = ((document.get("attestation") or {}).get("x509") or {}).get("caReferences") or {}
    return [refs[s] for s in ("primary", "secondary") if refs.get(s)]
