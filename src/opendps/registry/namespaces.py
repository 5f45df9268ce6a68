"""Namespaces, their credential (root CA) and policies (issuing CA + leaf settings).

The registry owns ``namespaces``, ``policies`` and ``certificate_authorities``: it decides lifecycle (names,
limits, rotation, references) and hands the CA what a policy signs with (:meth:`Registry.issuer`).
Enrollments live in provisioning, above this package; they block deleting the policies they name
through the :class:`PolicyReferrers` the service wiring binds.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from opendps import audit
from opendps.errors import Conflict, InvalidInput, NotFound, PreconditionFailed
from opendps.ids import check_resource_name, etag_matches, new_etag, take_row
from opendps.pki import (
    IssuanceEngine,
    IssuanceRefused,
    Issuer,
    KeyCustody,
    KeyStore,
    Publication,
    issuing_ca,
    root_ca,
    serial_hex,
    thumbprint,
)
from opendps.pki.issuance import revocation_reason, stored_serial
from opendps.store import CertificateAuthority, ConfigCache, Namespace, Policy, Store

MIN_VALIDITY_DAYS = 1
MAX_VALIDITY_DAYS = 90
DEFAULT_VALIDITY_DAYS = 30
MIN_CRL_HOURS = 1
MAX_CRL_HOURS = 24 * 7  # a relying party caching a CRL longer than a week would miss a revocation for too long
DEFAULT_CRL_HOURS = 24
CREDENTIAL_NAME = "default"


@dataclass(frozen=True)
class CredentialView:
    namespace: str
    name: str
    certificate: x509.Certificate
    key: KeyCustody | None = None  # where the root's private key is (software, or which token and label)


@dataclass(frozen=True)
class PolicyView:
    namespace: str
    name: str
    validity_days: int
    allow_p256: bool
    etag: str
    created_at: datetime
    updated_at: datetime
    issuing_ca: x509.Certificate
    policy_id: int
    revoke_superseded: bool = True
    crl_validity_hours: int = DEFAULT_CRL_HOURS
    key: KeyCustody | None = None  # where the active issuing CA's private key is


@dataclass(frozen=True)
class IssuingCaView:
    """One of a policy's issuing CAs, past or present, as the management API lists them."""

    id: int
    certificate: x509.Certificate
    status: str  # active | retired | revoked
    created_at: datetime
    revoked_at: datetime | None
    revocation_reason: str | None


@dataclass(frozen=True)
class IssuingCaRevocation:
    """An issuing CA just revoked, and how many of its leaves were revoked with it."""

    ca: IssuingCaView
    namespace: str
    policy: str
    leaves_revoked: int


@dataclass(frozen=True)
class PolicyRef:
    """A policy found by name, as an enrollment records it."""

    policy_id: int
    namespace: str
    name: str


@dataclass(frozen=True)
class IssuingCa:
    """An issuing CA a hub may trust: its certificate, whose policy it serves, and whether it still signs."""

    certificate: x509.Certificate
    namespace: str
    policy: str
    policy_id: int
    status: str  # active | retired


class PolicyReferrers(Protocol):
    """Who still names a policy (the enrollments, owned by provisioning)."""

    def enrollments_using_policies(self, policy_ids: Collection[int]) -> tuple[int, list[str]]:
        """(how many enrollments name one of ``policy_ids``, the ids of the first few)."""
        ...


class _Unbound:
    def enrollments_using_policies(self, policy_ids: Collection[int]) -> tuple[int, list[str]]:
        raise RuntimeError("Registry.referrers is not bound: build the services with opendps.services.wire")


@dataclass(frozen=True)
class NamespaceView:
    name: str
    etag: str
    created_at: datetime
    credential: x509.Certificate
    policies: list[str]


def check_crl_validity_hours(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"crlValidityInHours must be an integer, got {value!r}")
    if not MIN_CRL_HOURS <= value <= MAX_CRL_HOURS:
        raise InvalidInput(f"crlValidityInHours {value} is out of range: must be {MIN_CRL_HOURS}-{MAX_CRL_HOURS} hours")
    return value


def _ca_view(ca: CertificateAuthority) -> IssuingCaView:
    status = "revoked" if ca.revoked_at is not None else ca.status
    return IssuingCaView(ca.id, x509.load_der_x509_certificate(ca.der), status, ca.created_at, ca.revoked_at,
                         ca.revocation_reason)


def check_validity_days(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"validityPeriodInDays must be an integer, got {value!r}")
    if not MIN_VALIDITY_DAYS <= value <= MAX_VALIDITY_DAYS:
        raise InvalidInput(
            f"validityPeriodInDays {value} is out of range: must be {MIN_VALIDITY_DAYS}-{MAX_VALIDITY_DAYS} days"
        )
    return value


def _ca_row(namespace_id: int, kind: str, cert: x509.Certificate, key_id: str, *, parent_id: int | None = None,
            policy_id: int | None = None, now: datetime) -> CertificateAuthority:
    der = cert.public_bytes(Encoding.DER)
    return CertificateAuthority(
        namespace_id=namespace_id, kind=kind, parent_id=parent_id, policy_id=policy_id, key_id=key_id, der=der,
        subject=cert.subject.rfc4514_string(), serial=format(cert.serial_number, "x"),
        sha256=thumbprint(cert).lower(), not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc, status="active", created_at=now,
    )


def _ca_event(action: str, namespace: str, cert: x509.Certificate, **details: object) -> audit.Event:
    """An audit entry about a CA certificate: its SHA-256 thumbprint as the subject (never its key)."""
    return audit.Event(action, namespace=namespace, subject=thumbprint(cert), details={
        "serialNumber": serial_hex(cert), "certificateSubject": cert.subject.rfc4514_string(),
        "notAfter": cert.not_valid_after_utc, **details})


def _active_issuing_ca(s: Session, policy_id: int) -> CertificateAuthority | None:
    return s.scalars(
        select(CertificateAuthority)
        .where(CertificateAuthority.policy_id == policy_id, CertificateAuthority.status == "active")
        .order_by(CertificateAuthority.id.desc())
    ).first()


class Registry:
    def __init__(self, store: Store, keys: KeyStore, *, lint: bool = True) -> None:
        self.store = store
        self.keys = keys
        self.lint = lint
        self.referrers: PolicyReferrers = _Unbound()  # bound by opendps.services.wire
        # where CRLs are served (bound by opendps.services.wire): a new issuing CA names its root's; None: no URL
        self.publication: Publication | None = None
        self._issuers: ConfigCache[int, Issuer] = ConfigCache(store, capacity=1024)  # parsed, per policy

    # ---- helpers ----
    @staticmethod
    def _namespace(s: Session, name: str) -> Namespace:
        ns = s.scalars(select(Namespace).where(Namespace.name == name)).first()
        if ns is None:
            raise NotFound(f"namespace {name!r} does not exist")
        return ns

    @staticmethod
    def _root(s: Session, ns: Namespace) -> CertificateAuthority:
        return s.scalars(select(CertificateAuthority).where(
            CertificateAuthority.namespace_id == ns.id, CertificateAuthority.kind == "root",
            CertificateAuthority.status == "active")).one()

    @staticmethod
    def _policy(s: Session, ns: Namespace, name: str) -> Policy:
        p = s.scalars(select(Policy).where(Policy.namespace_id == ns.id, Policy.name == name)).first()
        if p is None:
            raise NotFound(f"policy {name!r} does not exist in namespace {ns.name!r}")
        return p

    def _root_crl_url(self, root: x509.Certificate) -> str | None:
        """The CRL Distribution Point of a new issuing CA: its root's CRL, where this installation serves it."""
        return self.publication.crl_url(root) if self.publication is not None else None

    def _policy_view(self, s: Session, ns: Namespace, p: Policy) -> PolicyView:
        ica = _active_issuing_ca(s, p.id)
        if ica is None:
            raise IssuanceRefused(f"policy {p.name!r} has no active issuing CA")
        return PolicyView(ns.name, p.name, p.validity_days, p.allow_p256, p.etag, p.created_at, p.updated_at,
                          x509.load_der_x509_certificate(ica.der), p.id, p.revoke_superseded, p.crl_validity_hours,
                          self.keys.custody(ica.key_id, session=s))

    def _add_policy(self, s: Session, ns: Namespace, root: CertificateAuthority, name: str, validity_days: int,
                    allow_p256: bool, now: datetime, key_backend: str | None = None) -> Policy:
        backend = self.keys.backend_for(key_backend)  # an unknown or unavailable backend before anything is made
        policy = Policy(namespace_id=ns.id, name=name, validity_days=validity_days, allow_p256=allow_p256,
                        etag=new_etag(), created_at=now, updated_at=now)
        s.add(policy)
        s.flush()
        root_signer = self.keys.signer(root.key_id)
        signer = self.keys.generate(s, "ica", backend=backend)
        root_cert = x509.load_der_x509_certificate(root.der)
        cert = issuing_ca(signer, root_cert, root_signer, f"{ns.name} {name} Issuing CA", now=now, lint=self.lint,
                          crl_url=self._root_crl_url(root_cert))
        s.add(_ca_row(ns.id, "issuing", cert, signer.key_id, parent_id=root.id, policy_id=policy.id, now=now))
        audit.append_all(s, [_ca_event(audit.CA_CREATED, ns.name, cert, kind="issuing", policy=name,
                                       validityDays=validity_days, keyBackend=backend)])
        return policy

    # ---- namespaces ----
    def create_namespace(self, name: str, policy_name: str = "default",
                         validity_days: int = DEFAULT_VALIDITY_DAYS, *, key_backend: str | None = None,
                         policy_key_backend: str | None = None) -> NamespaceView:
        """Create a namespace with its root CA and a first policy (like ``az iot adr ns create --policy-name``).
        ``key_backend``: where the root's key is made (software | pkcs11; default: the installation's), and the first
        policy's unless ``policy_key_backend`` says otherwise."""
        check_resource_name("namespace", name)
        check_resource_name("policy", policy_name)
        check_validity_days(validity_days)
        root_backend = self.keys.backend_for(key_backend)
        policy_backend = self.keys.backend_for(policy_key_backend if policy_key_backend is not None else key_backend)
        now = datetime.now(UTC)
        try:
            with self.store.session() as s:
                if s.scalars(select(Namespace.id).where(Namespace.name == name)).first() is not None:
                    raise Conflict(f"namespace {name!r} already exists")
                ns = Namespace(name=name, etag=new_etag(), created_at=now)
                s.add(ns)
                s.flush()
                root_signer = self.keys.generate(s, "root", backend=root_backend)
                root_cert = root_ca(root_signer, f"{name} Root CA", now=now, lint=self.lint)
                root = _ca_row(ns.id, "root", root_cert, root_signer.key_id, now=now)
                s.add(root)
                s.flush()
                audit.append_all(s, [_ca_event(audit.CA_CREATED, name, root_cert, kind="root", keyBackend=root_backend)])
                self._add_policy(s, ns, root, policy_name, validity_days, False, now, policy_backend)
        except IntegrityError as exc:  # lost a race with a concurrent create of the same name
            with self.store.session() as s:
                if s.scalars(select(Namespace.id).where(Namespace.name == name)).first() is None:
                    raise
            raise Conflict(f"namespace {name!r} already exists") from exc
        return self.get_namespace(name)

    def get_namespace(self, name: str) -> NamespaceView:
        with self.store.session() as s:
            ns = self._namespace(s, name)
            return self._ns_view(s, ns)

    def _ns_view(self, s: Session, ns: Namespace) -> NamespaceView:
        root = self._root(s, ns)
        policies = list(s.scalars(select(Policy.name).where(Policy.namespace_id == ns.id).order_by(Policy.name)))
        return NamespaceView(ns.name, ns.etag, ns.created_at, x509.load_der_x509_certificate(root.der), policies)

    def list_namespaces(self) -> list[NamespaceView]:
        with self.store.session() as s:
            return [self._ns_view(s, ns) for ns in s.scalars(select(Namespace).order_by(Namespace.name))]

    def delete_namespace(self, name: str) -> None:
        with self.store.session() as s:
            policy_ids = list(s.scalars(select(Policy.id).where(Policy.namespace_id == self._namespace(s, name).id)))
        _, refs = self.referrers.enrollments_using_policies(policy_ids)
        if refs:
            raise Conflict(f"namespace {name!r} has policies referenced by enrollments ({', '.join(refs)}); "
                           "delete or relink those enrollments first", error_code=409002)
        try:
            with self.store.session() as s:
                ns = self._namespace(s, name)
                take_row(s, ns, None, f"namespace {name!r}")  # of two deletes at once: one 204, the other 404
                # the namespace's PKI goes with it: CA certificates (their issued-certificate records cascade), keys
                cas = s.scalars(select(CertificateAuthority).where(CertificateAuthority.namespace_id == ns.id)).all()
                ca_ids = [ca.id for ca in cas]
                key_ids = [ca.key_id for ca in cas]
                s.execute(update(CertificateAuthority).where(CertificateAuthority.id.in_(ca_ids)).values(parent_id=None))
                s.execute(delete(CertificateAuthority).where(CertificateAuthority.id.in_(ca_ids)))
                s.execute(delete(Policy).where(Policy.namespace_id == ns.id))
                self.keys.destroy(s, key_ids)
                s.delete(ns)
        except IntegrityError as exc:  # an enrollment linked one of its policies meanwhile (foreign key)
            raise Conflict(f"namespace {name!r} has policies referenced by enrollments; delete or relink those "
                           "enrollments first", error_code=409002) from exc

    def credential(self, namespace: str) -> CredentialView:
        with self.store.session() as s:
            ns = self._namespace(s, namespace)
            root = self._root(s, ns)
            return CredentialView(ns.name, CREDENTIAL_NAME, x509.load_der_x509_certificate(root.der),
                                  self.keys.custody(root.key_id, session=s))

    # ---- policies ----
    def put_policy(self, namespace: str, name: str, *, validity_days: int | None = None,
                   allow_p256: bool | None = None, revoke_superseded: bool | None = None,
                   crl_validity_hours: int | None = None, key_backend: str | None = None,
                   if_match: str | None = None) -> tuple[PolicyView, bool]:
        """Create a policy (new issuing CA) or update its settings; returns (view, created). A setting not given
        keeps its value (its default for a new policy). ``key_backend`` says where a new policy's issuing CA key is
        made (default: the installation's); an existing policy's changes only with a rotation."""
        check_resource_name("policy", name)
        if validity_days is not None:
            check_validity_days(validity_days)
        if crl_validity_hours is not None:
            check_crl_validity_hours(crl_validity_hours)
        for field, value in (("allowP256", allow_p256), ("revokeSupersededCertificates", revoke_superseded)):
            if value is not None and not isinstance(value, bool):
                raise InvalidInput(f"{field} must be true or false, got {value!r}")
        now = datetime.now(UTC)
        try:
            with self.store.session() as s:
                ns = self._namespace(s, namespace)
                existing = s.scalars(select(Policy).where(Policy.namespace_id == ns.id, Policy.name == name)).first()
                if existing is None:
                    if if_match not in (None, "*"):
                        raise PreconditionFailed(f"policy {name!r} does not exist, so If-Match cannot match")
                    root = self._root(s, ns)
                    policy = self._add_policy(s, ns, root, name,
                                              DEFAULT_VALIDITY_DAYS if validity_days is None else validity_days,
                                              bool(allow_p256), now, key_backend)
                    created = True
                    policy.revoke_superseded = True if revoke_superseded is None else revoke_superseded
                    policy.crl_validity_hours = DEFAULT_CRL_HOURS if crl_validity_hours is None else crl_validity_hours
                else:
                    take_row(s, existing, if_match, f"policy {name!r}")
                    active = _active_issuing_ca(s, existing.id)
                    current = self.keys.custody(active.key_id, session=s).backend if active is not None else None
                    if key_backend is not None and key_backend != current:
                        raise InvalidInput(f"policy {name!r} keeps its issuing CA key in {current}: a key does not "
                                           f"move; rotate the policy with keyBackend {key_backend!r} to get a new "
                                           "issuing CA there")
                    if validity_days is not None:
                        existing.validity_days = validity_days
                    if allow_p256 is not None:
                        existing.allow_p256 = allow_p256
                    if revoke_superseded is not None:
                        existing.revoke_superseded = revoke_superseded
                    if crl_validity_hours is not None:
                        existing.crl_validity_hours = crl_validity_hours
                    existing.etag = new_etag()
                    existing.updated_at = now
                    policy = existing
                    created = False
                    changed = {k: v for k, v in (("validityDays", validity_days), ("allowP256", allow_p256),
                                                 ("revokeSupersededCertificates", revoke_superseded),
                                                 ("crlValidityInHours", crl_validity_hours)) if v is not None}
                    audit.append(s, audit.POLICY_UPDATED, namespace=ns.name, subject=name, details=changed)
                s.flush()
                return self._policy_view(s, ns, policy), created
        except IntegrityError as exc:
            raise Conflict(f"policy {name!r} was created concurrently; retry") from exc

    def rotate_policy(self, namespace: str, name: str, *, if_match: str | None = None,
                      key_backend: str | None = None) -> PolicyView:
        """New issuing CA for the policy; the old one is retired (still trusted by hubs until it expires,
        so devices holding certificates from it keep connecting until they renew). Its key is made where the
        retired one's is, or in ``key_backend`` (software | pkcs11: moving the policy's issuing CA)."""
        if key_backend is not None:
            self.keys.backend_for(key_backend)
        now = datetime.now(UTC)
        with self.store.session() as s:
            ns = self._namespace(s, namespace)
            policy = self._policy(s, ns, name)
            take_row(s, policy, if_match, f"policy {name!r}")  # rotations take turns: each retires the CA made before
            generation = 1 + (s.scalar(select(func.count()).select_from(CertificateAuthority)
                                       .where(CertificateAuthority.policy_id == policy.id)) or 0)
            retired = []
            # FOR UPDATE: waits for registrations still signing with it (their certificate's foreign key holds the
            # row), and they then read it retired (DeviceRegistry.record): none ends with the old CA after this commit
            for ca in s.scalars(select(CertificateAuthority).where(CertificateAuthority.policy_id == policy.id,
                                                                   CertificateAuthority.status == "active")
                                .with_for_update()):
                ca.status = "retired"
                retired.append(ca.sha256.upper())
                if key_backend is None:  # the policy's keys stay where they are
                    key_backend = self.keys.custody(ca.key_id, session=s).backend
            root = self._root(s, ns)
            signer = self.keys.generate(s, "ica", backend=key_backend)
            root_cert = x509.load_der_x509_certificate(root.der)
            cert = issuing_ca(signer, root_cert, self.keys.signer(root.key_id),
                              f"{ns.name} {name} Issuing CA G{generation}", now=now, lint=self.lint,
                              crl_url=self._root_crl_url(root_cert))
            s.add(_ca_row(ns.id, "issuing", cert, signer.key_id, parent_id=root.id, policy_id=policy.id, now=now))
            policy.etag = new_etag()
            policy.updated_at = now
            s.flush()
            audit.append_all(s, [_ca_event(audit.CA_ROTATED, ns.name, cert, policy=name, retired=retired,
                                           keyBackend=self.keys.backend_for(key_backend))])
            return self._policy_view(s, ns, policy)

    def get_policy(self, namespace: str, name: str) -> PolicyView:
        with self.store.session() as s:
            ns = self._namespace(s, namespace)
            return self._policy_view(s, ns, self._policy(s, ns, name))

    def list_policies(self, namespace: str) -> list[PolicyView]:
        with self.store.session() as s:
            ns = self._namespace(s, namespace)
            rows = s.scalars(select(Policy).where(Policy.namespace_id == ns.id).order_by(Policy.name))
            return [self._policy_view(s, ns, p) for p in rows]

    def delete_policy(self, namespace: str, name: str, *, if_match: str | None = None) -> None:
        with self.store.session() as s:
            policy = self._policy(s, self._namespace(s, namespace), name)
            if not etag_matches(if_match, policy.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match policy {name!r}, as per RFC7232")
            policy_id = policy.id
        count, refs = self.referrers.enrollments_using_policies([policy_id])
        if refs:
            raise Conflict(f"policy {name!r} is referenced by {count} enrollment(s) ({', '.join(refs)}); "
                           "delete or relink them first", error_code=409002)
        try:
            with self.store.session() as s:
                policy = self._policy(s, self._namespace(s, namespace), name)
                take_row(s, policy, if_match, f"policy {name!r}")  # of two deletes at once: one 204, the other 404
                # the issuing CA is retired, not deleted: issued certificates keep their issuer on record
                for ca in s.scalars(select(CertificateAuthority).where(CertificateAuthority.policy_id == policy.id)
                                    .with_for_update()):
                    ca.status = "retired"
                s.flush()
                s.delete(policy)
        except IntegrityError as exc:  # an enrollment linked it meanwhile (foreign key)
            raise Conflict(f"policy {name!r} is referenced by an enrollment; delete or relink it first",
                           error_code=409002) from exc

    # ---- what other packages ask of policies ----
    def find_policy(self, name: str, namespace: str | None = None) -> PolicyRef:
        """A credential policy by name (in ``namespace``, or the only one so named); InvalidInput otherwise."""
        if not isinstance(name, str) or not name:
            raise InvalidInput("credentialPolicyName must be a policy name")
        check_resource_name("policy", name)  # what no policy can be named is refused here, not bound into SQL
        if namespace is not None:
            check_resource_name("namespace", namespace)
        with self.store.session() as s:
            q = select(Policy.id, Namespace.name).join(Namespace, Policy.namespace_id == Namespace.id)
            q = q.where(Policy.name == name)
            if namespace is not None:
                q = q.where(Namespace.name == namespace)
            rows = s.execute(q).all()
        if not rows:
            where = f" in namespace {namespace!r}" if namespace else ""
            raise InvalidInput(f"credential policy {name!r}{where} does not exist")
        if len(rows) > 1:
            raise InvalidInput(f"credential policy {name!r} exists in several namespaces "
                               f"({', '.join(sorted(n for _, n in rows))}); also give namespaceName")
        policy_id, ns = rows[0]
        return PolicyRef(policy_id, ns, name)

    def issuer(self, policy_id: int) -> Issuer:
        """What the policy signs with now: its leaf settings, active issuing CA and root — from the configuration
        cache, so a rotation or policy update made on any node is used by the next registration."""
        return self._issuers.get(policy_id, lambda: self._load_issuer(policy_id))

    def _load_issuer(self, policy_id: int) -> Issuer:
        """The issuer as stored, in one query."""
        root = aliased(CertificateAuthority)
        with self.store.session() as s:
            row = s.execute(
                select(Policy, CertificateAuthority, root, Namespace.name)
                .join(Namespace, Namespace.id == Policy.namespace_id)
                .outerjoin(CertificateAuthority, (CertificateAuthority.policy_id == Policy.id)
                           & (CertificateAuthority.status == "active"))
                .outerjoin(root, root.id == CertificateAuthority.parent_id)
                .where(Policy.id == policy_id).order_by(CertificateAuthority.id.desc()).limit(1)).first()
        if row is None:
            raise NotFound(f"policy {policy_id} does not exist")
        policy, ica, root_ca_row, namespace = row
        if ica is None or root_ca_row is None:
            raise IssuanceRefused(f"policy {policy.name!r} has no active issuing CA")
        return Issuer(policy.id, policy.name, policy.validity_days, policy.allow_p256, ica.id, ica.key_id,
                      x509.load_der_x509_certificate(ica.der), x509.load_der_x509_certificate(root_ca_row.der),
                      policy.revoke_superseded, policy.crl_validity_hours, namespace)

    def namespace_of(self, policy_id: int) -> int | None:
        """The id of the namespace a policy belongs to (None once the policy is gone)."""
        with self.store.session() as s:
            return s.scalar(select(Policy.namespace_id).where(Policy.id == policy_id))

    def issuing_cas(self, policy_ids: Collection[int], *, now: datetime) -> list[IssuingCa]:
        """Issuing CAs of ``policy_ids`` still valid at ``now`` and not revoked, active or retired (their
        certificates stay in use until the devices renew), oldest first."""
        if not policy_ids:
            return []
        with self.store.session() as s:
            rows = s.execute(
                # Policy.id rather than the CA's nullable policy_id: the inner join makes them equal
                select(CertificateAuthority, Policy.id, Policy.name, Namespace.name)
                .join(Policy, CertificateAuthority.policy_id == Policy.id)
                .join(Namespace, Policy.namespace_id == Namespace.id)
                .where(CertificateAuthority.kind == "issuing", CertificateAuthority.policy_id.in_(list(policy_ids)),
                       CertificateAuthority.not_after > now, CertificateAuthority.revoked_at.is_(None))
                .order_by(CertificateAuthority.id)
            ).all()
            return [IssuingCa(x509.load_der_x509_certificate(ca.der), ns, pol, policy_id, ca.status)
                    for ca, policy_id, pol, ns in rows]

    # ---- a policy's issuing CAs, and revoking one (issue 17) ----
    def list_issuing_cas(self, namespace: str, policy: str) -> list[IssuingCaView]:
        """Every issuing CA the policy has had, newest first: the active one, retired ones, revoked ones."""
        with self.store.session() as s:
            p = self._policy(s, self._namespace(s, namespace), policy)
            rows = s.scalars(select(CertificateAuthority).where(CertificateAuthority.policy_id == p.id)
                             .order_by(CertificateAuthority.id.desc())).all()
            return [_ca_view(ca) for ca in rows]

    def policy_issuing_ca_ids(self, namespace: str, policy: str) -> tuple[list[int], list[x509.Certificate]]:
        """Ids and certificates of every issuing CA the policy has had (the CA revokes "every certificate issued
        under a policy" by these; the hub drops live sessions by their key identifiers)."""
        with self.store.session() as s:
            p = self._policy(s, self._namespace(s, namespace), policy)
            rows = s.execute(select(CertificateAuthority.id, CertificateAuthority.der)
                             .where(CertificateAuthority.policy_id == p.id)).all()
        return [r.id for r in rows], [x509.load_der_x509_certificate(r.der) for r in rows]

    def revoke_issuing_ca(self, namespace: str, policy: str, serial_or_thumbprint: str, reason: str | None,
                          issuance: IssuanceEngine, *, now: datetime | None = None) -> IssuingCaRevocation:
        """Revoke one of the policy's retired issuing CAs (key compromise: rotate the policy, then revoke the old
        CA) and, in the same transaction, every unrevoked leaf it signed. Hubs stop trusting it at once (a
        configuration change); the root's CRL lists it. The active CA cannot be revoked: a policy must always have
        one that signs, so rotate first (409)."""
        reason = revocation_reason(reason)
        # leaves of a compromised CA: RFC 5280's cACompromise says why better than repeating the CA's keyCompromise
        leaf_reason = "cACompromise" if reason in ("keyCompromise", "cACompromise") else reason
        now = now or datetime.now(UTC)
        text = serial_or_thumbprint.strip().replace(":", "").lower()
        with self.store.session() as s:
            ns = self._namespace(s, namespace)
            p = self._policy(s, ns, policy)
            q = select(CertificateAuthority).where(CertificateAuthority.policy_id == p.id)
            if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
                q = q.where(CertificateAuthority.sha256 == text)
            else:
                q = q.where(CertificateAuthority.serial == stored_serial(serial_or_thumbprint))
            ca = s.scalars(q.with_for_update()).first()  # as rotate_policy: its in-flight leaves are committed first
            if ca is None:
                raise NotFound(f"policy {policy!r} has no issuing CA with serial number or thumbprint "
                               f"{serial_or_thumbprint!r}")
            if ca.revoked_at is not None:
                raise Conflict(f"issuing CA {ca.subject} is already revoked ({ca.revocation_reason}, "
                               f"{ca.revoked_at:%Y-%m-%dT%H:%M:%SZ})")
            if ca.status == "active":
                raise Conflict(f"issuing CA {ca.subject} is the policy's active one: rotate the policy first "
                               "(opendps adr ns policy rotate), then revoke the old CA")
            # only while still unrevoked: on SQLite the read above is outside the write transaction, so two revokes
            # at once both read it unrevoked; the second must be refused, not rewrite the first's date and reason
            # (a configuration change: every hub's trust drops the CA at its next CONNECT, on every node)
            done = s.execute(update(CertificateAuthority)
                             .where(CertificateAuthority.id == ca.id, CertificateAuthority.revoked_at.is_(None))
                             .values(revoked_at=now, revocation_reason=reason)
                             .execution_options(synchronize_session=False))
            if cast(CursorResult[Any], done).rowcount != 1:
                raise Conflict(f"issuing CA {ca.subject} was revoked by a concurrent call")
            s.refresh(ca)
            leaves = issuance.revoke_issued_by([ca.id], leaf_reason, now=now, session=s)
            # one entry for the CA and all its leaves (there may be a million)
            audit.append(s, audit.CA_REVOKED, namespace=ns.name, subject=ca.sha256.upper(), details={
                "policy": p.name, "serialNumber": serial_hex(int(ca.serial, 16)), "reason": reason,
                "leafReason": leaf_reason, "revokedCertificates": leaves})
            return IssuingCaRevocation(_ca_view(ca), ns.name, p.name, leaves)
