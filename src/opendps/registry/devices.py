"""The namespace's device registry (ADR): one record per provisioned device with its current certificate.

Provisioning writes a record in the transaction of each registration or renewal (:meth:`DeviceRegistry.record`);
the hub asks who a certificate's device is (:meth:`DeviceRegistry.registration_id`).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from sqlalchemy import bindparam, exists, insert, select, update
from sqlalchemy.orm import Session

from opendps.errors import InvalidInput, NotFound, ServiceUnavailable
from opendps.ids import check_resource_name, new_etag
from opendps.pki import serial_hex, thumbprint
from opendps.store import (
    CertificateAuthority,
    ConfigCache,
    DeviceRecord,
    Namespace,
    Policy,
    Store,
    Transaction,
    joined,
    table_of,
)
from opendps.transport import shown
from opendps.transport.wire import iso8601

# every registration writes a record: prepared statements (compiled once), not the ORM's unit of work
_RECORDS = table_of(DeviceRecord)
_RECORD_ID_BY_KEY = select(_RECORDS.c.id).where(_RECORDS.c.namespace_id == bindparam("b_ns"),
                                                _RECORDS.c.device_key == bindparam("b_key"))
_INSERT_RECORD = insert(_RECORDS)
_REGISTRATION_OF = select(_RECORDS.c.registration_id).where(_RECORDS.c.namespace_id == bindparam("b_ns"),
                                                             _RECORDS.c.device_key == bindparam("b_key"))
_UPDATE_RECORD = update(_RECORDS).where(_RECORDS.c.id == bindparam("b_id"))
_POLICY_NAME = (select(table_of(Policy).c.name, table_of(Namespace).c.name.label("namespace"))
                .join(table_of(Namespace), table_of(Namespace).c.id == table_of(Policy).c.namespace_id)
                .where(table_of(Policy).c.id == bindparam("b_id")))
_CAS = table_of(CertificateAuthority)
# with an issued certificate: the record's id and whether the certificate's issuing CA is still its policy's active,
# unrevoked one, in one statement (read after the certificate's row was inserted: see DeviceRegistry.record)
_RECORD_ID_AND_ISSUER = select(_RECORD_ID_BY_KEY.scalar_subquery().label("id"), exists().where(
    _CAS.c.id == bindparam("b_ca"), _CAS.c.policy_id == bindparam("b_policy"), _CAS.c.status == "active",
    _CAS.c.revoked_at.is_(None)).label("issuer_active"))
_POLICY_NAMESPACE = select(table_of(Policy).c.namespace_id).where(table_of(Policy).c.id == bindparam("b_id"))


class IssuerRetired(ServiceUnavailable):
    """A certificate was signed by an issuing CA that its policy rotated away (or revoked) while the registration or
    renewal was being decided: nothing is kept. A registration is decided again at once
    (``Provisioning.register``); a hub renewal answers this (503 with Retry-After: devices retry it)."""

    def __init__(self, policy: str) -> None:
        super().__init__(f"the issuing CA of credential policy {policy!r} was rotated or revoked while this request "
                         "was processed; nothing was issued: retry", info={"retryAfter": "1"}, reason="issuer_rotated")


def check_lookup_id(device_id: object) -> str:
    """A device or registration id that certificates are looked up by: 1-128 printable ASCII characters (what IoT Hub's
    device ids and DPS' registration ids have in common), so a NUL or a lone surrogate is refused by name, not handed
    to the database (which cannot hold them)."""
    if not isinstance(device_id, str) or not 1 <= len(device_id) <= 128 or not device_id.isascii() \
            or not device_id.isprintable():
        raise InvalidInput(f"device id {shown(device_id)} is invalid: a device or registration id is 1-128 printable "
                           "ASCII characters")
    return device_id


@dataclass(frozen=True)
class DeviceRecordView:
    namespace: str
    device_id: str
    registration_id: str
    hub_host_name: str
    policy: str | None
    certificate_serial: str | None
    certificate_sha256: str | None
    certificate_not_after: datetime | None
    etag: str
    created_at: datetime
    updated_at: datetime

    def to_wire(self) -> dict[str, Any]:
        cert = None
        if self.certificate_serial:
            cert = {"serialNumber": serial_hex(int(self.certificate_serial, 16)),
                    "sha256Thumbprint": (self.certificate_sha256 or "").upper(),
                    "notAfter": iso8601(self.certificate_not_after) if self.certificate_not_after else None,
                    "policy": self.policy}
        return {"name": self.device_id, "etag": self.etag, "properties": {
            "registrationId": self.registration_id, "iotHubHostName": self.hub_host_name, "policy": self.policy,
            "operationalCertificate": cert, "createdAt": iso8601(self.created_at), "updatedAt": iso8601(self.updated_at)}}


class DeviceRegistry:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._namespaces: ConfigCache[int, int | None] = ConfigCache(store)  # policy id -> its namespace's id
        self._registration_of = store.prepare(_REGISTRATION_OF)
        self._policy_namespace = store.prepare(_POLICY_NAMESPACE)

    def _namespace_of(self, policy_id: int, cursor: Callable[[], Any]) -> int | None:
        """From the configuration cache: every registration records a device and policies change rarely; ``cursor``
        gives one of the caller's transaction to read it on when it is not cached."""
        return self._namespaces.get(policy_id, lambda: getattr(
            self._policy_namespace.first(cursor(), b_id=policy_id), "namespace_id", None))

    def _rows(self, s: Session, namespace: str, device_id: str | None = None, *, top: int | None = None,
              after: str = "") -> list[DeviceRecordView]:
        ns = s.scalars(select(Namespace).where(Namespace.name == namespace)).first()
        if ns is None:
            raise NotFound(f"namespace {namespace!r} does not exist")
        q = (select(DeviceRecord, Policy.name).outerjoin(Policy, DeviceRecord.policy_id == Policy.id)
             .where(DeviceRecord.namespace_id == ns.id).order_by(DeviceRecord.device_key))
        if device_id is not None:
            q = q.where(DeviceRecord.device_key == device_id.lower())
        if after:
            q = q.where(DeviceRecord.device_key > after.lower())
        if top is not None:
            q = q.limit(top)
        return [DeviceRecordView(namespace, r.device_id, r.registration_id, r.hub_host_name, p, r.certificate_serial,
                                 r.certificate_sha256, r.certificate_not_after, r.etag, r.created_at, r.updated_at)
                for r, p in s.execute(q).all()]

    def list(self, namespace: str, *, top: int | None = None, after: str = "") -> list[DeviceRecordView]:
        """The namespace's records in device key order; ``top``: at most that many; ``after``: those whose key comes
        after it (a keyset page on the (namespace, device key) index)."""
        with self.store.session() as s:
            return self._rows(s, namespace, top=top, after=after)

    def get(self, namespace: str, device_id: str) -> DeviceRecordView:
        with self.store.session() as s:
            rows = self._rows(s, namespace, device_id)
            if not rows:
                raise NotFound(f"device {device_id!r} is not in the device registry of namespace {namespace!r}")
            return rows[0]

    def record(self, db: Session | Transaction, *, policy_id: int, device_id: str, registration_id: str,
               hub_host: str, certificate: x509.Certificate | None, issuing_ca_id: int | None = None,
               now: datetime) -> None:
        """Create or update the device's record in the namespace of ``policy_id``, in the caller's transaction;
        ``certificate`` (when one was issued, by the CA ``issuing_ca_id``) becomes the device's current operational
        certificate — only while that CA is still the policy's active, unrevoked one (else :class:`IssuerRetired`
        rolls the transaction back).

        Why: the caller decided what to sign with before this transaction (a custom allocation webhook may take
        seconds), so a rotation, or a rotation and the old CA's revocation, could commit meanwhile, and the device got
        a certificate of a retired or revoked CA (unrevoked, its CA no longer trusted by hubs). The certificate's row
        is inserted before this runs: on PostgreSQL its foreign key holds the CA row (KEY SHARE), which a rotation or
        revocation locks FOR UPDATE first, so either this reads the CA as they left it, or they wait for this commit.
        """
        # prepared statements on the transaction's driver cursor, not the ORM unit of work: this runs in every
        # registration
        tx = joined(db)
        namespace_id = self._namespace_of(policy_id, lambda: tx.cursor)
        if namespace_id is None:
            return  # the policy was deleted meanwhile: nothing to record it in
        key = device_id.lower()
        if certificate is None:
            found = tx.first(_RECORD_ID_BY_KEY, b_ns=namespace_id, b_key=key)
        else:
            if issuing_ca_id is None:
                raise ValueError("a certificate is recorded with the id of the CA that issued it")
            row = tx.first(_RECORD_ID_AND_ISSUER, b_ns=namespace_id, b_key=key, b_policy=policy_id, b_ca=issuing_ca_id)
            if row is None or not row.issuer_active:
                named = tx.first(_POLICY_NAME, b_id=policy_id)
                raise IssuerRetired(f"{named.namespace}/{named.name}" if named is not None else str(policy_id))
            found = row if row.id is not None else None
        values: dict[str, Any] = {"registration_id": registration_id, "hub_host_name": hub_host, "policy_id": policy_id,
                                  "etag": new_etag(), "updated_at": now}
        if certificate is not None:
            values.update(certificate_serial=format(certificate.serial_number, "x"),
                          certificate_sha256=thumbprint(certificate).lower(),
                          certificate_not_after=certificate.not_valid_after_utc)
        if found is None:
            tx.run(_INSERT_RECORD, namespace_id=namespace_id, device_id=device_id, device_key=key, created_at=now,
                   **values)
        else:
            tx.run(_UPDATE_RECORD, b_id=found.id, **values)

    def registration_id(self, cursor: Any, policy_id: int, device_id: str) -> str | None:
        """The registration id recorded for ``device_id`` in the namespace of ``policy_id`` (None: no record); one
        prepared statement, on the cursor of the caller's driver transaction (the hub asks on every CONNECT)."""
        namespace_id = self._namespace_of(policy_id, lambda: cursor)
        if namespace_id is None:
            return None
        row = self._registration_of.first(cursor, b_ns=namespace_id, b_key=device_id.lower())
        return row.registration_id if row is not None else None

    def records_of(self, device_ids: Collection[str]) -> builtins.list[DeviceRecordView]:
        """The records of these devices in every namespace (the fleet dashboard's page of devices: their current
        certificates): one lookup per (namespace, device key) on the unique index, namespaces being few."""
        keys = sorted({d.lower() for d in device_ids})
        if not keys:
            return []
        with self.store.session() as s:
            namespaces = {i: n for i, n in s.execute(select(Namespace.id, Namespace.name)).all()}
            if not namespaces:
                return []
            q = (select(DeviceRecord, Policy.name).outerjoin(Policy, DeviceRecord.policy_id == Policy.id)
                 .where(DeviceRecord.namespace_id.in_(sorted(namespaces)), DeviceRecord.device_key.in_(keys))
                 .order_by(DeviceRecord.device_key, DeviceRecord.updated_at.desc()))
            return [DeviceRecordView(namespaces[r.namespace_id], r.device_id, r.registration_id, r.hub_host_name, p,
                                     r.certificate_serial, r.certificate_sha256, r.certificate_not_after, r.etag,
                                     r.created_at, r.updated_at)
                    for r, p in s.execute(q).all()]

    # ---- who a device's certificates were issued to (certificate list and revocation, issue 17) ----
    def registration_ids(self, device_id: str, namespace: str | None = None) -> builtins.list[str]:
        """The registration ids whose certificates are ``device_id``'s: the id itself (a registration id, or a
        device id equal to it, as most are) and every registration id its device records name (in ``namespace``
        only, when given)."""
        check_lookup_id(device_id)
        if namespace is not None:
            check_resource_name("namespace", namespace)
        with self.store.session() as s:
            q = select(DeviceRecord.registration_id).where(DeviceRecord.device_key == device_id.lower())
            if namespace is not None:
                q = q.join(Namespace, DeviceRecord.namespace_id == Namespace.id).where(Namespace.name == namespace)
            found = set(s.scalars(q).all())
        return sorted(found | {device_id, device_id.lower()})

    def issuing_ca_ids(self, namespace: str) -> builtins.list[int]:
        """Every issuing CA of ``namespace``, active or retired (NotFound: no such namespace)."""
        check_resource_name("namespace", namespace)
        with self.store.session() as s:
            ns = s.scalar(select(Namespace.id).where(Namespace.name == namespace))
            if ns is None:
                raise NotFound(f"namespace {namespace!r} does not exist")
            return list(s.scalars(select(CertificateAuthority.id).where(CertificateAuthority.namespace_id == ns,
                                                                        CertificateAuthority.kind == "issuing")))
