"""Namespaces, credential and policies."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from opendps.errors import Conflict, InvalidInput, NotFound, PreconditionFailed
from opendps.ids import check_resource_name, etag_matches, new_etag
from opendps.pki import KeyStore, active_issuing_ca, issuing_ca, root_ca
from opendps.store import (
    CertificateAuthority,
    Enrollment,
    IssuedCertificate,
    Namespace,
    Policy,
    Store,
    WrappedKey,
)

MIN_VALIDITY_DAYS = 1
MAX_VALIDITY_DAYS = 90
DEFAULT_VALIDITY_DAYS = 30
CREDENTIAL_NAME = "default"


@dataclass(frozen=True)
class CredentialView:
    namespace: str
    name: str
    certificate: x509.Certificate


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


@dataclass(frozen=True)
class NamespaceView:
    name: str
    etag: str
    created_at: datetime
    credential: x509.Certificate
    policies: list[str]


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
        sha256=hashlib.sha256(der).hexdigest(), not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc, status="active", created_at=now,
    )


class Registry:
    def __init__(self, store: Store, keys: KeyStore, *, lint: bool = True):
        self.store = store
        self.keys = keys
        self.lint = lint

    # ---- helpers ----
    @staticmethod
    def _namespace(s, name: str) -> Namespace:  # noqa: ANN001
        ns = s.scalars(select(Namespace).where(Namespace.name == name)).first()
        if ns is None:
            raise NotFound(f"namespace {name!r} does not exist", error_code=404001)
        return ns

    @staticmethod
    def _root(s, ns: Namespace) -> CertificateAuthority:  # noqa: ANN001
        return s.scalars(select(CertificateAuthority).where(
            CertificateAuthority.namespace_id == ns.id, CertificateAuthority.kind == "root",
            CertificateAuthority.status == "active")).one()

    @staticmethod
    def _policy(s, ns: Namespace, name: str) -> Policy:  # noqa: ANN001
        p = s.scalars(select(Policy).where(Policy.namespace_id == ns.id, Policy.name == name)).first()
        if p is None:
            raise NotFound(f"policy {name!r} does not exist in namespace {ns.name!r}", error_code=404001)
        return p

    def _policy_view(self, s, ns: Namespace, p: Policy) -> PolicyView:  # noqa: ANN001
        ica = active_issuing_ca(s, p.id)
        return PolicyView(ns.name, p.name, p.validity_days, p.allow_p256, p.etag, p.created_at, p.updated_at,
                          x509.load_der_x509_certificate(ica.der), p.id)

    def _add_policy(self, s, ns: Namespace, root: CertificateAuthority, name: str, validity_days: int,  # noqa: ANN001
                    allow_p256: bool, now: datetime) -> Policy:
        policy = Policy(namespace_id=ns.id, name=name, validity_days=validity_days, allow_p256=allow_p256,
                        etag=new_etag(), created_at=now, updated_at=now)
        s.add(policy)
        s.flush()
        root_signer = self.keys.signer(root.key_id)
        signer = self.keys.generate(s, "ica")
        cert = issuing_ca(signer, x509.load_der_x509_certificate(root.der), root_signer,
                          f"{ns.name} {name} Issuing CA", now=now, lint=self.lint)
        s.add(_ca_row(ns.id, "issuing", cert, signer.key_id, parent_id=root.id, policy_id=policy.id, now=now))
        return policy

    # ---- namespaces ----
    def create_namespace(self, name: str, policy_name: str = "default",
                         validity_days: int = DEFAULT_VALIDITY_DAYS) -> NamespaceView:
        """Create a namespace with its root CA and a first policy (like ``az iot adr ns create --policy-name``)."""
        check_resource_name("namespace", name)
        check_resource_name("policy", policy_name)
        check_validity_days(validity_days)
        now = datetime.now(UTC)
        try:
            with self.store.session() as s:
                if s.scalars(select(Namespace.id).where(Namespace.name == name)).first() is not None:
                    raise Conflict(f"namespace {name!r} already exists", error_code=409001)
                ns = Namespace(name=name, etag=new_etag(), created_at=now)
                s.add(ns)
                s.flush()
                root_signer = self.keys.generate(s, "root")
                root_cert = root_ca(root_signer, f"{name} Root CA", now=now, lint=self.lint)
                root = _ca_row(ns.id, "root", root_cert, root_signer.key_id, now=now)
                s.add(root)
                s.flush()
                self._add_policy(s, ns, root, policy_name, validity_days, False, now)
        except IntegrityError as exc:  # lost a race with a concurrent create of the same name
            with self.store.session() as s:
                if s.scalars(select(Namespace.id).where(Namespace.name == name)).first() is None:
                    raise
            raise Conflict(f"namespace {name!r} already exists", error_code=409001) from exc
        return self.get_namespace(name)

    def get_namespace(self, name: str) -> NamespaceView:
        with self.store.session() as s:
            ns = self._namespace(s, name)
            return self._ns_view(s, ns)

    def _ns_view(self, s, ns: Namespace) -> NamespaceView:  # noqa: ANN001
        root = self._root(s, ns)
        policies = list(s.scalars(select(Policy.name).where(Policy.namespace_id == ns.id).order_by(Policy.name)))
        return NamespaceView(ns.name, ns.etag, ns.created_at, x509.load_der_x509_certificate(root.der), policies)

    def list_namespaces(self) -> list[NamespaceView]:
        with self.store.session() as s:
            return [self._ns_view(s, ns) for ns in s.scalars(select(Namespace).order_by(Namespace.name))]

    def delete_namespace(self, name: str) -> None:
        with self.store.session() as s:
            ns = self._namespace(s, name)
            refs = s.scalars(select(Enrollment.enrollment_id).join(Policy, Enrollment.policy_id == Policy.id)
                             .where(Policy.namespace_id == ns.id).limit(5)).all()
            if refs:
                raise Conflict(f"namespace {name!r} has policies referenced by enrollments ({', '.join(refs)}); "
                               "delete or relink those enrollments first", error_code=409002)
            # the namespace's PKI goes with it: issued-certificate records, CA certificates, wrapped keys
            cas = s.scalars(select(CertificateAuthority).where(CertificateAuthority.namespace_id == ns.id)).all()
            ca_ids = [ca.id for ca in cas]
            key_ids = [ca.key_id for ca in cas]
            s.execute(delete(IssuedCertificate).where(IssuedCertificate.issuing_ca_id.in_(ca_ids)))
            s.execute(update(CertificateAuthority).where(CertificateAuthority.id.in_(ca_ids)).values(parent_id=None))
            s.execute(delete(CertificateAuthority).where(CertificateAuthority.id.in_(ca_ids)))
            s.execute(delete(Policy).where(Policy.namespace_id == ns.id))
            s.execute(delete(WrappedKey).where(WrappedKey.id.in_(key_ids)))
            s.delete(ns)
        self.keys.forget(key_ids)

    def credential(self, namespace: str) -> CredentialView:
        with self.store.session() as s:
            ns = self._namespace(s, namespace)
            root = self._root(s, ns)
            return CredentialView(ns.name, CREDENTIAL_NAME, x509.load_der_x509_certificate(root.der))

    # ---- policies ----
    def put_policy(self, namespace: str, name: str, *, validity_days: int | None = None,
                   allow_p256: bool | None = None, if_match: str | None = None) -> tuple[PolicyView, bool]:
        """Create a policy (new issuing CA) or update its leaf settings; returns (view, created)."""
        check_resource_name("policy", name)
        if validity_days is not None:
            check_validity_days(validity_days)
        if allow_p256 is not None and not isinstance(allow_p256, bool):
            raise InvalidInput(f"allowP256 must be true or false, got {allow_p256!r}")
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
                                              bool(allow_p256), now)
                    created = True
                else:
                    if not etag_matches(if_match, existing.etag):
                        raise PreconditionFailed(
                            f"ETag {if_match} does not match policy {name!r} (current {existing.etag}), as per RFC7232")
                    if validity_days is not None:
                        existing.validity_days = validity_days
                    if allow_p256 is not None:
                        existing.allow_p256 = allow_p256
                    existing.etag = new_etag()
                    existing.updated_at = now
                    policy = existing
                    created = False
                s.flush()
                return self._policy_view(s, ns, policy), created
        except IntegrityError as exc:
            raise Conflict(f"policy {name!r} was created concurrently; retry", error_code=409001) from exc

    def rotate_policy(self, namespace: str, name: str, *, if_match: str | None = None) -> PolicyView:
        """New issuing CA for the policy; the old one is retired (still trusted by hubs until it expires,
        so devices holding certificates from it keep connecting until they renew)."""
        now = datetime.now(UTC)
        with self.store.session() as s:
            ns = self._namespace(s, namespace)
            policy = self._policy(s, ns, name)
            if not etag_matches(if_match, policy.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match policy {name!r}, as per RFC7232")
            generation = 1 + (s.scalar(select(func.count()).select_from(CertificateAuthority)
                                       .where(CertificateAuthority.policy_id == policy.id)) or 0)
            for ca in s.scalars(select(CertificateAuthority).where(CertificateAuthority.policy_id == policy.id,
                                                                   CertificateAuthority.status == "active")):
                ca.status = "retired"
            root = self._root(s, ns)
            signer = self.keys.generate(s, "ica")
            cert = issuing_ca(signer, x509.load_der_x509_certificate(root.der), self.keys.signer(root.key_id),
                              f"{ns.name} {name} Issuing CA G{generation}", now=now, lint=self.lint)
            s.add(_ca_row(ns.id, "issuing", cert, signer.key_id, parent_id=root.id, policy_id=policy.id, now=now))
            policy.etag = new_etag()
            policy.updated_at = now
            s.flush()
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
            ns = self._namespace(s, namespace)
            policy = self._policy(s, ns, name)
            if not etag_matches(if_match, policy.etag):
                raise PreconditionFailed(f"ETag {if_match} does not match policy {name!r}, as per RFC7232")
            refs = s.scalars(select(Enrollment.enrollment_id).where(Enrollment.policy_id == policy.id).limit(5)).all()
            if refs:
                count = s.scalar(select(func.count()).select_from(Enrollment).where(Enrollment.policy_id == policy.id))
                raise Conflict(f"policy {name!r} is referenced by {count} enrollment(s) ({', '.join(refs)}); "
                               "delete or relink them first", error_code=409002)
            # the issuing CA is retired, not deleted: issued certificates keep their issuer on record
            for ca in s.scalars(select(CertificateAuthority).where(CertificateAuthority.policy_id == policy.id)):
                ca.status = "retired"
            s.flush()
            s.delete(policy)

    def find_policy_id(self, namespace: str | None, name: str) -> int:
        """Resolve a credential policy name (in ``namespace`` or, if None, the only one so named)."""
        with self.store.session() as s:
            q = select(Policy.id).where(Policy.name == name)
            if namespace is not None:
                q = q.join(Namespace, Namespace.id == Policy.namespace_id).where(Namespace.name == namespace)
            ids = s.scalars(q).all()
        if not ids:
            raise NotFound(f"credential policy {name!r} does not exist", error_code=404001)
        if len(ids) > 1:
            raise InvalidInput(f"credential policy name {name!r} is ambiguous: give the namespace too")
        return ids[0]
