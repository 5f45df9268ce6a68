"""The owner's CA certificates uploaded to DPS (seed steps 4-5), which X.509 enrollment groups reference.

The proof-of-possession rules are :class:`opendps.pki.CaCertificates`'; what DPS adds is that a certificate an
enrollment group references cannot be deleted (the group would be stuck), as namespaces and policies cannot.
"""

from __future__ import annotations

from sqlalchemy import select

from opendps.errors import Conflict
from opendps.pki import CaCertificates
from opendps.provisioning.enrollments import GROUP, ca_names
from opendps.store import DpsCertificate, Enrollment, Store


class DpsCertificates(CaCertificates):
    def __init__(self, store: Store) -> None:
        super().__init__(store, DpsCertificate)

    def groups_using(self, name: str) -> list[str]:
        """Ids of the X.509 enrollment groups whose caReferences name certificate ``name``."""
        with self.store.session() as s:
            rows = s.execute(select(Enrollment.enrollment_id, Enrollment.document)
                             .where(Enrollment.kind == GROUP, Enrollment.attestation_type == "x509")
                             .order_by(Enrollment.id)).all()
        return [eid for eid, doc in rows if name in ca_names(doc)]

    def delete(self, name: str, *, if_match: str | None = None) -> None:
        users = self.groups_using(name)
        if users:
            raise Conflict(f"certificate {name!r} is referenced by enrollment group(s) {', '.join(users[:5])}; delete "
                           "them or change their caReferences first", error_code=409002)
        super().delete(name, if_match=if_match)
