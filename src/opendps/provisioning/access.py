"""DPS shared access policies (``az iot dps policy``): who may call the service API, with which rights.

A policy is a name, its rights and two keys (base64 of 32 random bytes unless given), wrapped by the master key
under the labels ``access-policy:{name}:primary|secondary`` — the labels every installation has used, so existing
keys stay readable. ``provisioningserviceowner`` is made at init and cannot be deleted; at least one policy keeps
``ServiceConfig``, so the service can always be configured. ``iothubowner`` is not a DPS policy: that name signs
for a linked hub (each hub's own pair, :meth:`opendps.hub.Hubs.owner_keys`); an older installation's shared row of
that name is only read once, for the default hub to adopt (:meth:`AccessPolicies.former_hub_owner_keys`).

Rights are Azure DPS's. Azure's API refuses a policy with ``EnrollmentWrite`` but without ``EnrollmentRead``,
``RegistrationStatusRead`` and ``RegistrationStatusWrite``, or with ``EnrollmentRead`` / ``RegistrationStatusWrite``
but without ``RegistrationStatusRead``, and its default owner policy lists only ``ServiceConfig, DeviceConnect,
EnrollmentWrite``; opendps reads those requirements as implications (:data:`IMPLIED`) instead of refusing, so
every rights set Azure accepts means the same here, and the owner's stored rights keep meaning everything.
``DeviceConnect`` is accepted and stored; no service route needs it (devices authenticate by attestation).

Token checks ask :meth:`AccessPolicies.credentials` on every request; it answers from a cache kept at most
:data:`CACHE_SECONDS` per name (misses too, so made-up names cannot hammer the database). A change made through
this object empties the cache at once; another process sharing the database sees a renewed, changed or deleted
policy within :data:`CACHE_SECONDS` — the bound on how long an old key keeps working there.

Owns ``access_policies``.
"""

from __future__ import annotations

import base64
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import false, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from opendps.errors import Conflict, InvalidInput, NotFound
from opendps.hub.auth import OWNER_POLICY as HUB_POLICY_NAME
from opendps.pki import KeyStore
from opendps.provisioning.enrollments import check_key
from opendps.store import AccessPolicy, Store
from opendps.transport import shown

OWNER_POLICY = "provisioningserviceowner"
OWNER_RIGHTS = "ServiceConfig, DeviceConnect, EnrollmentWrite"  # as Azure makes it (and every installation has)
HUB_OWNER_POLICY = HUB_POLICY_NAME  # reserved: hub tokens (the hub's own policy, Hubs.owner_keys)

SERVICE_CONFIG = "ServiceConfig"
ENROLLMENT_READ = "EnrollmentRead"
ENROLLMENT_WRITE = "EnrollmentWrite"
DEVICE_CONNECT = "DeviceConnect"
REGISTRATION_STATUS_READ = "RegistrationStatusRead"
REGISTRATION_STATUS_WRITE = "RegistrationStatusWrite"
RIGHTS = (SERVICE_CONFIG, ENROLLMENT_READ, ENROLLMENT_WRITE, DEVICE_CONNECT, REGISTRATION_STATUS_READ,
          REGISTRATION_STATUS_WRITE)  # Azure's order (AccessRightsDescription)
IMPLIED: dict[str, frozenset[str]] = {
    ENROLLMENT_WRITE: frozenset({ENROLLMENT_READ, REGISTRATION_STATUS_READ, REGISTRATION_STATUS_WRITE}),
    ENROLLMENT_READ: frozenset({REGISTRATION_STATUS_READ}),
    REGISTRATION_STATUS_WRITE: frozenset({REGISTRATION_STATUS_READ}),
}
RENEW_KEYS = ("primary", "secondary", "swap")

CACHE_SECONDS = 5.0
CACHE_SIZE = 1024  # names kept at most (then the cache starts over): garbage names cannot grow it without bound
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # Azure's policy names: letters, digits, '.', '_', '-'; 1-64


def effective_rights(rights: Iterable[str]) -> frozenset[str]:
    """The rights a policy holds: its own and the ones they imply (:data:`IMPLIED`); unknown names grant nothing."""
    held = {r for r in rights if r in RIGHTS}
    for right in list(held):
        held |= IMPLIED.get(right, frozenset())
    return frozenset(held)


def parse_rights(value: object) -> tuple[str, ...]:
    """Rights as given: ``"A, B"`` (Azure's form), ``["A", "B"]``, spaces or commas between; any letter case.
    Returns them known, deduplicated and in Azure's order; refuses an unknown right or none at all."""
    if isinstance(value, str):
        names = [n for n in re.split(r"[\s,]+", value) if n]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = [p for n in value for p in re.split(r"[\s,]+", n) if p]
    else:
        raise InvalidInput("rights must be a string such as \"EnrollmentRead, RegistrationStatusRead\" or a list")
    canonical = {r.lower(): r for r in RIGHTS}
    unknown = [n for n in names if n.lower() not in canonical]
    if unknown:
        raise InvalidInput(f"unknown right {unknown[0]!r}: rights are {', '.join(RIGHTS)}")
    chosen = {canonical[n.lower()] for n in names}
    if not chosen:
        raise InvalidInput(f"a policy needs at least one right ({', '.join(RIGHTS)})")
    return tuple(r for r in RIGHTS if r in chosen)


def _stored_rights(value: str) -> tuple[str, ...]:
    return tuple(r for r in (p.strip() for p in value.split(",")) if r)


def check_policy_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"access policy name {shown(name)} is invalid: use 1-64 letters, digits, '.', '_' and '-'")
    if name.lower() == HUB_OWNER_POLICY:
        raise InvalidInput(f"{HUB_OWNER_POLICY!r} is reserved for linked hubs' own keys (opendps hub policy)")
    return name


def new_key() -> str:
    """256 random bits, base64: Azure's policy key size."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class AccessPolicyView:
    """What list and show say about a policy: never its keys."""

    name: str
    rights: tuple[str, ...]  # as stored (the owner's as Azure makes it; others in Azure's order)
    created_at: datetime

    @property
    def rights_text(self) -> str:
        return ", ".join(self.rights)


@dataclass(frozen=True)
class PolicyCredentials:
    """What a token check needs: the effective rights and both keys (left out of ``repr``, so never logged)."""

    name: str
    rights: frozenset[str]
    primary_key: str = field(repr=False)
    secondary_key: str = field(repr=False)


def _label(name: str, which: str) -> str:
    return f"access-policy:{name}:{which}"


class AccessPolicies:
    """The service's shared access policies: the one owner of ``access_policies``.

    ``ttl`` and ``clock`` (monotonic seconds) bound the token-check cache; tests pass a clock they move.
    """

    def __init__(self, store: Store, keys: KeyStore, *, ttl: float = CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.keys = keys
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, PolicyCredentials | None]] = {}
        self._generation = 0  # bumped by every local change: a lookup that raced a change does not cache

    # ---- reading ----
    def list(self) -> list[AccessPolicyView]:
        with self.store.session() as s:
            rows = s.scalars(select(AccessPolicy).order_by(AccessPolicy.created_at, AccessPolicy.name)).all()
            return [_view(r) for r in rows if r.name != HUB_OWNER_POLICY]

    def get(self, name: str) -> AccessPolicyView:
        with self.store.session() as s:
            return _view(self._row(s, name))

    def keys_of(self, name: str) -> tuple[str, str]:
        """The policy's (primary, secondary) keys (``az iot dps policy show`` prints them; the API only here)."""
        with self.store.session() as s:
            return self._unwrap(self._row(s, name))

    def former_hub_owner_keys(self) -> tuple[str, str] | None:
        """The ``iothubowner`` pair older installations shared for every hub (store migration 0006), or None."""
        with self.store.session() as s:
            row = s.get(AccessPolicy, HUB_OWNER_POLICY)
            return self._unwrap(row) if row is not None else None

    # ---- token checks (cached) ----
    def credentials(self, name: str) -> PolicyCredentials | None:
        """The policy a token names, or None; from the cache when fresh (see the module docstring)."""
        hit, value = self.cached_credentials(name)
        if hit:
            return value
        with self._lock:
            generation = self._generation
        value = self._load(name)
        with self._lock:
            if generation == self._generation:
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.clear()
                self._cache[name] = (self.clock() + self.ttl, value)
        return value

    def cached_credentials(self, name: str) -> tuple[bool, PolicyCredentials | None]:
        """(found in the cache, value) without touching the database: front ends ask this on the event loop first."""
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == HUB_OWNER_POLICY:
            return True, None  # no such policy can exist: nothing to look up
        with self._lock:
            entry = self._cache.get(name)
            if entry is not None and entry[0] > self.clock():
                return True, entry[1]
        return False, None

    def _load(self, name: str) -> PolicyCredentials | None:
        with self.store.session() as s:
            row = s.get(AccessPolicy, name)
            if row is None:
                return None
            primary, secondary = self._unwrap(row)
            return PolicyCredentials(row.name, effective_rights(_stored_rights(row.rights)), primary, secondary)

    def forget(self) -> None:
        """Empty the token-check cache: another process changed a policy (``frontends.runtime`` hears of it)."""
        self._changed()

    def _changed(self) -> None:
        with self._lock:
            self._cache.clear()
            self._generation += 1

    # ---- changing ----
    def ensure(self, name: str, rights: str) -> None:
        """At init: the policy ``name`` with ``rights`` (stored as given) unless it exists; another node may race."""
        try:
            with self.store.session() as s:
                if s.get(AccessPolicy, name) is None:
                    self._add(s, name, rights, new_key(), new_key())
        except IntegrityError:
            pass  # another node created it first
        self._changed()

    def put(self, name: str, rights: object, *, primary_key: object = None, secondary_key: object = None,
            exists: bool | None = None) -> tuple[AccessPolicyView, bool]:
        """Create the policy (keys generated unless given) or update its rights and the keys given; returns (view,
        created). ``exists``: True = update only (404 if absent), False = create only (409 if present)."""
        check_policy_name(name)
        chosen = parse_rights(rights)
        primary = check_key(primary_key, "primaryKey") if primary_key is not None else None
        secondary = check_key(secondary_key, "secondaryKey") if secondary_key is not None else None
        try:
            with self.store.session() as s:
                rows = self._lock_all(s)
                row = rows.get(name)
                if row is None:
                    if exists:
                        raise NotFound(f"no access policy named {name!r}")
                    twin = next((n for n in rows if n.lower() == name.lower()), None)
                    if twin is not None:
                        raise Conflict(f"access policy {twin!r} already exists (names are matched ignoring case)")
                    row = self._add(s, name, ", ".join(chosen), primary or new_key(), secondary or new_key())
                    created = True
                else:
                    if exists is False:
                        raise Conflict(f"access policy {name!r} already exists")
                    if SERVICE_CONFIG not in chosen and not self._others_configure(rows, name):
                        raise Conflict(f"access policy {name!r} is the only one with {SERVICE_CONFIG}: grant it to "
                                       "another policy first, or nobody could configure the service")
                    row.rights = ", ".join(chosen)
                    if primary is not None or secondary is not None:
                        old_primary, old_secondary = self._unwrap(row)
                        self._set_keys(row, primary or old_primary, secondary or old_secondary)
                    created = False
                view = _view(row)
        except IntegrityError as exc:  # created by another node between our read and our insert
            raise Conflict(f"access policy {name!r} already exists") from exc
        finally:
            self._changed()
        return view, created

    def delete(self, name: str) -> None:
        """Delete a policy: never the owner, never the last one with ServiceConfig. Its tokens stop working."""
        if name == OWNER_POLICY:
            raise Conflict(f"{OWNER_POLICY!r} cannot be deleted (it is the installation's owner policy); "
                           "change its rights or renew its keys instead", error_code=409002)
        try:
            with self.store.session() as s:
                rows = self._lock_all(s)
                row = rows.get(name)
                if row is None or name == HUB_OWNER_POLICY:
                    raise NotFound(f"no access policy named {name!r}")
                if SERVICE_CONFIG in effective_rights(_stored_rights(row.rights)) \
                        and not self._others_configure(rows, name):
                    raise Conflict(f"access policy {name!r} is the only one with {SERVICE_CONFIG}: grant it to another "
                                   "policy first, or nobody could configure the service", error_code=409002)
                s.delete(row)
        finally:
            self._changed()

    def renew_key(self, name: str, which: object) -> tuple[str, str]:
        """``renew-key``: a new ``primary`` or ``secondary`` key, or ``swap`` the two (tokens signed with a replaced
        key stop working). Returns the new (primary, secondary)."""
        if which not in RENEW_KEYS:
            raise InvalidInput(f"renewKey must be primary, secondary or swap (got {which!r})")
        try:
            with self.store.session() as s:
                self._lock_all(s)
                row = self._row(s, name, lock=True)
                primary, secondary = self._unwrap(row)
                renewed = {"primary": (new_key(), secondary), "secondary": (primary, new_key()),
                           "swap": (secondary, primary)}[str(which)]
                self._set_keys(row, *renewed)
        finally:
            self._changed()
        return renewed

    # ---- rows ----
    def _row(self, s: Session, name: str, *, lock: bool = False) -> AccessPolicy:
        query = select(AccessPolicy).where(AccessPolicy.name == name)
        row = None if name == HUB_OWNER_POLICY else s.scalars(query.with_for_update() if lock else query).first()
        if row is None:
            raise NotFound(f"no access policy named {name!r}")
        return row

    @staticmethod
    def _lock_all(s: Session) -> dict[str, AccessPolicy]:
        """Every policy, locked: the ServiceConfig rule sees them all, and changes take turns. PostgreSQL locks the
        rows; SQLite has no FOR UPDATE and pysqlite begins a transaction at its first write, so reads alone left two
        deletes (both 204) or two renewals (one answered a key already replaced) racing: a write that changes
        nothing takes its write lock first."""
        if s.get_bind().dialect.name == "sqlite":
            s.execute(update(AccessPolicy).where(false()).values(rights=AccessPolicy.rights)
                      .execution_options(synchronize_session=False))
        return {r.name: r for r in s.scalars(select(AccessPolicy).with_for_update()).all()}

    @staticmethod
    def _others_configure(rows: dict[str, AccessPolicy], name: str) -> bool:
        return any(SERVICE_CONFIG in effective_rights(_stored_rights(r.rights))
                   for n, r in rows.items() if n not in (name, HUB_OWNER_POLICY))

    def _add(self, s: Session, name: str, rights: str, primary: str, secondary: str) -> AccessPolicy:
        row = AccessPolicy(name=name, rights=rights, primary_key=b"", secondary_key=b"", created_at=datetime.now(UTC))
        self._set_keys(row, primary, secondary)
        s.add(row)
        s.flush()
        return row

    def _set_keys(self, row: AccessPolicy, primary: str, secondary: str) -> None:
        row.primary_key = self.keys.wrap(primary.encode(), _label(row.name, "primary"))
        row.secondary_key = self.keys.wrap(secondary.encode(), _label(row.name, "secondary"))

    def _unwrap(self, row: AccessPolicy) -> tuple[str, str]:
        return (self.keys.unwrap(row.primary_key, _label(row.name, "primary")).decode(),
                self.keys.unwrap(row.secondary_key, _label(row.name, "secondary")).decode())


def _view(row: AccessPolicy) -> AccessPolicyView:
    return AccessPolicyView(row.name, _stored_rights(row.rights), row.created_at)
