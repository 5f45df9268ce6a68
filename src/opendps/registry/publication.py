"""Which CAs publish their status (issue 17.3): the registry's answer to :class:`opendps.pki.StatusResponder`.

Every root and issuing CA not yet expired publishes a CRL — a retired issuing CA too (its leaves are still in use
until they renew) and a revoked one (its CRL still lists what it revoked) — and the issuing CAs answer OCSP. The
registry owns ``certificate_authorities`` and ``policies``, so it hands the CA what it needs as
:class:`~opendps.pki.PublishedCa` values: certificate, key, CRL validity (the policy's ``crlValidityInHours``; a
root's is the shortest of its namespace's policies, so a revoked issuing CA reaches relying parties as fast as
the strictest policy promises), and for a root the issuing CAs it revoked. The list comes from the configuration
cache: a rotation, a revoked issuing CA or a policy change made on any node is seen by the next request everywhere.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from cryptography import x509
from sqlalchemy import func, select

from opendps.pki import PublishedCa, RevokedEntry
from opendps.store import CertificateAuthority, ConfigCache, Policy, Store

DEFAULT_CRL_HOURS = 24  # a CA whose policy is gone (its issuing CA is kept, retired) or a namespace without policies


class PublishedAuthorities:
    """The CAs whose CRLs and OCSP this installation serves (bound to ``StatusResponder.authorities`` by
    ``services.wire``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: ConfigCache[int, tuple[PublishedCa, ...]] = ConfigCache(store, capacity=1)

    def __call__(self) -> tuple[PublishedCa, ...]:
        """Every CA not yet expired, as one tuple that stays the same object while the configuration does (the
        responder indexes it once)."""
        return self._cache.get(0, self._load)

    def _load(self) -> tuple[PublishedCa, ...]:
        now = datetime.now(UTC)
        with self.store.session() as s:
            rows = s.execute(
                select(CertificateAuthority.id, CertificateAuthority.kind, CertificateAuthority.namespace_id,
                       CertificateAuthority.parent_id, CertificateAuthority.key_id, CertificateAuthority.der,
                       CertificateAuthority.serial, CertificateAuthority.revoked_at,
                       CertificateAuthority.revocation_reason, Policy.crl_validity_hours)
                .outerjoin(Policy, Policy.id == CertificateAuthority.policy_id)
                .where(CertificateAuthority.not_after > now).order_by(CertificateAuthority.id)).all()
            shortest: dict[int, int] = {ns: hours for ns, hours in s.execute(
                select(Policy.namespace_id, func.min(Policy.crl_validity_hours)).group_by(Policy.namespace_id))}
        revoked: dict[int, list[RevokedEntry]] = defaultdict(list)  # root id -> the issuing CAs it revoked
        for r in rows:
            if r.kind == "issuing" and r.revoked_at is not None and r.parent_id is not None:
                revoked[r.parent_id].append(RevokedEntry(int(r.serial, 16), r.revoked_at,
                                                         r.revocation_reason or "unspecified"))
        return tuple(
            PublishedCa(r.id, r.kind, x509.load_der_x509_certificate(r.der), r.key_id,
                        r.crl_validity_hours or shortest.get(r.namespace_id) or DEFAULT_CRL_HOURS,
                        tuple(revoked.get(r.id, ())))
            for r in rows)


__all__ = ["PublishedAuthorities"]
