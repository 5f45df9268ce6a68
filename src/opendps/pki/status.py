"""Certificate status publication: each CA's CRL and the issuing CAs' OCSP responder, built on demand and cached.

Where (:class:`Publication`): one URL base per installation — the plain-HTTP listener (``--http-port``), or the
HTTPS one when that is off — under which ``/crl/{ca}.crl`` is a CA's CRL (``{ca}``: the first 8 octets of the SHA-1
of its key, in hex: short, and stable for the CA's life) and ``/ocsp`` the OCSP responder of every issuing CA (a
request names its issuer by the hashes of its name and key). Leaves carry both URLs, issuing CAs their root's CRL
URL: a leaf never names a URL the installation does not serve.

What (:class:`PublishedCa`): the registry hands the CAs over — each root and issuing CA not yet expired (a retired
or revoked one keeps publishing until then), the CRL validity of its policy, and for a root its revoked issuing CAs.
An issuing CA's revoked leaves are this package's own records (``issued_certificates``).

Cost and freshness, per process (:class:`StatusResponder`): a CA's CRL is rebuilt when its revocation state changes
or half its validity has passed, else the signed one is served again. The state of an issuing CA is one indexed
query (count and latest time of its revoked certificates, ``ix_issued_certificates_revoked``), asked at most once a
second per CA; a root's comes with the registry's configuration, whose counter every request reads. An OCSP answer
reads the certificate's row (by serial, a unique index) on every request and reuses the signed answer while that
status and the CA's validity are unchanged and half its validity has not passed. So a revocation made on any node
is in every process's OCSP answers at once and in its CRLs within a second.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import bindparam, func, select

from opendps.errors import NotFound, ServiceUnavailable
from opendps.pki.crl import RevokedEntry, build_crl
from opendps.pki.keys import KeyStore
from opendps.pki.ocsp import (
    HASHES,
    INTERNAL_ERROR,
    MALFORMED_REQUEST,
    TRY_LATER,
    UNAUTHORIZED,
    MalformedOcspRequest,
    OcspQuery,
    build_response,
    key_hash,
    name_hash,
    parse_request,
)
from opendps.pki.profiles import IssuanceRefused, LintedShapes
from opendps.store import IssuedCertificate, Store, driver_message, table_of, unavailable

log = logging.getLogger("opendps.pki")

CRL_PATH = "/crl/{ca}.crl"
OCSP_PATH = "/ocsp"
STATE_TTL = 1.0  # seconds a CA's revocation state is used before the store is asked again
MAX_CACHED_RESPONSES = 20_000  # signed OCSP answers kept per process (~600 bytes each: ~15 MB at most)

_ISSUED = table_of(IssuedCertificate)
# both served by ix_issued_certificates_revoked (partial: revoked rows only), so neither grows with the fleet
_REVOCATION_STATE = (select(func.count(), func.max(_ISSUED.c.revoked_at))
                     .where(_ISSUED.c.issuing_ca_id == bindparam("b_ca"), _ISSUED.c.revoked_at.is_not(None)))
_REVOKED_LEAVES = (select(_ISSUED.c.serial, _ISSUED.c.revoked_at, _ISSUED.c.revocation_reason)
                   .where(_ISSUED.c.issuing_ca_id == bindparam("b_ca"), _ISSUED.c.revoked_at.is_not(None),
                          _ISSUED.c.not_after > bindparam("b_now")))
_STATUS_BY_SERIAL = (select(_ISSUED.c.issuing_ca_id, _ISSUED.c.revoked_at, _ISSUED.c.revocation_reason)
                     .where(_ISSUED.c.serial == bindparam("b_serial")))


def _lint_accepts_url(url: str) -> bool:
    """What pkilint's URI syntax check says of ``url`` (it asks the ``validators`` package, a dependency of pkilint)."""
    try:
        import validators  # type: ignore[import-untyped]  # no type information; pkilint brings it
    except ImportError:  # pragma: no cover - pkilint brings it
        return True
    return validators.url(url) is True


def ca_ref(certificate: x509.Certificate) -> str:
    """A CA's name in its CRL URL: the first 8 octets of the SHA-1 of its key (its key identifier), in hex."""
    return key_hash(certificate)[:8].hex()


@dataclass(frozen=True)
class Publication:
    """Where this installation publishes certificate status: ``base_url`` (scheme, host, port; no path)."""

    base_url: str

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")) or self.base_url.endswith("/"):
            raise ValueError(f"publication base URL {self.base_url!r} must be http(s)://host[:port] without a path")

    @classmethod
    def at(cls, scheme: str, host: str, port: int) -> Publication:
        """The publication on ``scheme://host:port`` (the default port left out). ``localhost`` is written as
        127.0.0.1: pkilint refuses a URI whose host is a single DNS label (its URL syntax check wants a domain with a
        top-level part or an IP address), and every certificate is linted before it is signed, so a URL it refuses
        would stop all issuance. ValueError for another host it would refuse (the caller publishes nothing then)."""
        try:
            address = ipaddress.ip_address(host)
            host = f"[{address.compressed}]" if address.version == 6 else address.compressed
        except ValueError:
            host = "127.0.0.1" if host.lower().rstrip(".") == "localhost" else host.lower()
        default = {"http": 80, "https": 443}[scheme]
        publication = cls(f"{scheme}://{host}" + ("" if port == default else f":{port}"))
        if not _lint_accepts_url(publication.ocsp_url):
            raise ValueError(f"{host!r} is not a host name a certificate's URL may carry (pkilint wants a fully "
                             "qualified domain name or an IP address)")
        return publication

    def crl_url(self, ca: x509.Certificate) -> str:
        return self.base_url + CRL_PATH.format(ca=ca_ref(ca))

    @property
    def ocsp_url(self) -> str:
        return self.base_url + OCSP_PATH


@dataclass(frozen=True)
class PublishedCa:
    """A CA whose status this installation publishes, as the registry hands it over."""

    ca_id: int
    kind: str  # "root" | "issuing"
    certificate: x509.Certificate
    key_id: str
    crl_validity_hours: int
    revoked: tuple[RevokedEntry, ...] = ()  # a root's revoked issuing CAs (an issuing CA's leaves are pki's records)

    @property
    def validity(self) -> timedelta:
        return timedelta(hours=self.crl_validity_hours)


@dataclass(frozen=True)
class StatusDocument:
    """A CRL or OCSP response (DER) as served: error answers (unsigned OCSP statuses) have no times."""

    der: bytes
    this_update: datetime | None = None
    next_update: datetime | None = None
    etag: str = field(default="", compare=False)

    @classmethod
    def signed(cls, der: bytes, this_update: datetime, next_update: datetime) -> StatusDocument:
        return cls(der, this_update, next_update, hashlib.sha256(der).hexdigest()[:32])

    @property
    def refresh_at(self) -> datetime:
        """Half its validity: then a new one is made (a relying party's cache sees it before nextUpdate)."""
        assert self.this_update is not None and self.next_update is not None
        return self.this_update + (self.next_update - self.this_update) / 2

    def reusable(self, now: datetime) -> bool:
        """Whether to serve it again at ``now``: made at or before ``now`` and half its validity not passed. A
        document made before the wall clock was stepped back has a thisUpdate in the future, which relying parties
        refuse as not yet valid (OpenSSL: CRL not yet valid), for as long as the step."""
        assert self.this_update is not None
        return self.this_update <= now < self.refresh_at

    def valid_at(self, now: datetime) -> bool:
        """Whether a relying party takes it at ``now`` (the last one served while the CA key cannot sign)."""
        return self.this_update is not None and self.next_update is not None and \
            self.this_update <= now < self.next_update


def _unbound() -> Sequence[PublishedCa]:
    raise RuntimeError("StatusResponder.authorities is not bound: build the services with opendps.services.wire")


@dataclass
class _Index:
    source: Sequence[PublishedCa] | None = None
    by_ref: dict[str, PublishedCa] = field(default_factory=dict)
    by_certid: dict[tuple[str, bytes, bytes], PublishedCa] = field(default_factory=dict)


class StatusResponder:
    """Serves CRLs and OCSP answers for the CAs :attr:`authorities` names (bound by ``services.wire`` to
    ``Registry.published_cas``). Thread-safe: called from the domain thread pool."""

    def __init__(self, store: Store, keys: KeyStore, *, lint: bool = True) -> None:
        self.store = store
        self.keys = keys
        self.lint = lint
        self.authorities: Callable[[], Sequence[PublishedCa]] = _unbound
        self.linted = LintedShapes()  # OCSP response shapes pkilint passed
        self._lock = threading.Lock()
        self._index = _Index()
        self._states: dict[int, tuple[float, object]] = {}  # issuing CA id -> (read at, revocation state)
        self._crls: dict[int, tuple[object, StatusDocument]] = {}  # CA id -> (state it was built for, the CRL)
        self._answers: OrderedDict[tuple[int, str, int], tuple[object, StatusDocument]] = OrderedDict()

    # ---- which CA ----
    def _lookup(self) -> _Index:
        source = self.authorities()
        with self._lock:
            if self._index.source is source:
                return self._index
        index = _Index(source)
        for ca in source:
            index.by_ref[ca_ref(ca.certificate)] = ca
            if ca.kind == "issuing":
                for algorithm in HASHES:
                    index.by_certid[(algorithm, name_hash(ca.certificate, algorithm),
                                     key_hash(ca.certificate, algorithm))] = ca
        with self._lock:
            self._index = index
        return index

    def find(self, ref: str, *, now: datetime | None = None) -> PublishedCa:
        """The CA published as ``ref`` (:func:`ca_ref`); NotFound when there is none, or it has expired."""
        now = now or datetime.now(UTC)
        ca = self._lookup().by_ref.get(ref.lower())
        if ca is None or ca.certificate.not_valid_after_utc <= now:
            raise NotFound(f"no certificate authority publishes a CRL as {ref!r} here")
        return ca

    # ---- CRLs ----
    def _leaf_state(self, ca_id: int) -> object:
        """(how many, latest revocation time) of the issuing CA's revoked certificates: at most one query a second."""
        clock = time.monotonic()
        with self._lock:
            memo = self._states.get(ca_id)
        if memo is not None and clock - memo[0] < STATE_TTL:
            return memo[1]
        with self.store.session() as s:
            row = s.connection().execute(_REVOCATION_STATE, {"b_ca": ca_id}).one()
        state = (int(row[0]), row[1])
        with self._lock:
            self._states[ca_id] = (clock, state)
        return state

    def crl(self, ref: str, *, now: datetime | None = None) -> StatusDocument:
        """The current CRL of the CA published as ``ref``: the cached one while the CA's revocation state and
        validity are those it was built for and half its validity has not passed, else a new one."""
        now = now or datetime.now(UTC)
        ca = self.find(ref, now=now)
        state = (ca.certificate, ca.crl_validity_hours,
                 ca.revoked if ca.kind == "root" else self._leaf_state(ca.ca_id))
        with self._lock:
            cached = self._crls.get(ca.ca_id)
        if cached is not None and cached[0] == state and cached[1].reusable(now):
            return cached[1]
        if ca.kind == "root":
            entries: Sequence[RevokedEntry] = ca.revoked
        else:
            with self.store.session() as s:
                rows = s.connection().execute(_REVOKED_LEAVES, {"b_ca": ca.ca_id, "b_now": now}).all()
            entries = [RevokedEntry(int(r.serial, 16), r.revoked_at, r.revocation_reason or "unspecified")
                       for r in rows]
        next_update = min(now + ca.validity, ca.certificate.not_valid_after_utc)
        try:
            crl = build_crl(self.keys.signer(ca.key_id), ca.certificate, entries, this_update=now,
                            next_update=next_update, lint=self.lint)
        except IssuanceRefused as exc:  # our CRL failed our checks: a server fault, not the relying party's
            raise RuntimeError(f"the CRL of {ca.certificate.subject.rfc4514_string()} was refused: {exc}") from exc
        except ServiceUnavailable:  # the CA key cannot sign now (its token away): the last CRL while it is valid
            if cached is not None and cached[0] == state and cached[1].valid_at(now):
                return cached[1]
            raise  # 503 with Retry-After
        document = StatusDocument.signed(crl.public_bytes(Encoding.DER), crl.last_update_utc, crl.next_update_utc
                                         or next_update)
        with self._lock:
            self._crls[ca.ca_id] = (state, document)
        return document

    # ---- OCSP ----
    def ocsp(self, request: bytes, *, now: datetime | None = None) -> StatusDocument:
        """The answer to a DER OCSPRequest: signed good / revoked / unknown from the issuing CA, ``unauthorized``
        for an issuer not published here, ``malformedRequest`` for anything that is not one request, and
        ``tryLater`` while the CA key cannot sign (its token away: retryable, and said once by the token, not per
        request) and ``internalError`` (logged) if signing fails otherwise. Never raises."""
        try:
            query = parse_request(request)
        except MalformedOcspRequest:
            return StatusDocument(MALFORMED_REQUEST)
        try:
            return self._answer(query, now or datetime.now(UTC))
        except ServiceUnavailable:
            return StatusDocument(TRY_LATER)
        except Exception as exc:
            if unavailable(exc):  # the database away for now: retryable, and no traceback per request meanwhile
                log.debug("OCSP: no answer for serial %x while the database is away: %s", query.serial,
                          driver_message(exc))
                return StatusDocument(TRY_LATER)
            log.exception("OCSP: cannot answer for serial %x", query.serial)  # RFC 6960 internalError, traceback logged
            return StatusDocument(INTERNAL_ERROR)

    def _answer(self, query: OcspQuery, now: datetime) -> StatusDocument:
        ca = None
        if query.algorithm is not None:
            ca = self._lookup().by_certid.get((query.algorithm, query.issuer_name_hash, query.issuer_key_hash))
        if ca is None or ca.certificate.not_valid_after_utc <= now or query.serial < 0:
            return StatusDocument(UNAUTHORIZED)  # RFC 5019 2.2.3: not a CA this responder answers for
        with self.store.session() as s:
            row = s.connection().execute(_STATUS_BY_SERIAL, {"b_serial": format(query.serial, "x")}).first()
        known = row is not None and row.issuing_ca_id == ca.ca_id
        revoked = (RevokedEntry(query.serial, row.revoked_at, row.revocation_reason or "unspecified")
                   if known and row is not None and row.revoked_at is not None else None)
        assert query.algorithm is not None
        key = (ca.ca_id, query.algorithm, query.serial)
        state = (ca.certificate, ca.crl_validity_hours, known, revoked)
        with self._lock:
            cached = self._answers.get(key)
            if cached is not None and cached[0] == state and cached[1].reusable(now):
                self._answers.move_to_end(key)
                return cached[1]
        next_update = min(now + ca.validity, ca.certificate.not_valid_after_utc)
        try:
            der = build_response(self.keys.signer(ca.key_id), ca.certificate, query, known=known, revoked=revoked,
                                 this_update=now, next_update=next_update, lint=self.lint, shapes=self.linted)
        except ServiceUnavailable:  # the CA key cannot sign now: the last answer while it is valid, else tryLater
            if cached is not None and cached[0] == state and cached[1].valid_at(now):
                return cached[1]
            raise
        # the times as encoded (whole seconds), so the HTTP caching headers say what the response says
        document = StatusDocument.signed(der, now.replace(microsecond=0), next_update.replace(microsecond=0))
        with self._lock:
            self._answers[key] = (state, document)
            self._answers.move_to_end(key)
            while len(self._answers) > MAX_CACHED_RESPONSES:
                self._answers.popitem(last=False)
        return document

    def forget(self) -> None:
        """Drop every cached CRL, answer and state (tests; an operator's key change)."""
        with self._lock:
            self._states.clear()
            self._crls.clear()
            self._answers.clear()
            self._index = _Index()


__all__ = ["CRL_PATH", "OCSP_PATH", "Publication", "PublishedCa", "StatusDocument", "StatusResponder", "ca_ref"]
