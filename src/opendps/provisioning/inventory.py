"""The RA counted (``GET /status``): enrollments, devices provisioned, register operations of the last hour.

Cheap on a large store: enrollments are configuration (few); the provisioned count is one ``COUNT`` of the
registration states; the recent operations one ``GROUP BY status`` over a range of ``operations.created_at`` (the
index the 24 h sweep uses), so only the last hour's rows are read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from opendps.provisioning.enrollments import GROUP
from opendps.store import Enrollment, Operation, Registration, Store


@dataclass(frozen=True)
class ProvisioningCounts:
    individual_enrollments: int
    enrollment_groups: int
    disabled_enrollments: int  # of both kinds
    provisioned: int  # registration states assigned to a hub
    operations: dict[str, int]  # register operations created since the time asked, by status (assigned, failed...)


class ProvisioningInventory:
    def __init__(self, store: Store) -> None:
        self.store = store

    def counts(self, since: datetime) -> ProvisioningCounts:
        with self.store.session() as s:
            kinds = s.execute(select(Enrollment.kind, Enrollment.provisioning_status, func.count())
                              .group_by(Enrollment.kind, Enrollment.provisioning_status)).all()
            provisioned = s.scalar(select(func.count()).select_from(Registration)
                                   .where(Registration.status == "assigned")) or 0
            operations = s.execute(select(Operation.status, func.count()).where(Operation.created_at >= since)
                                   .group_by(Operation.status)).all()
        groups = sum(int(n) for kind, _, n in kinds if kind == GROUP)
        return ProvisioningCounts(
            individual_enrollments=sum(int(n) for kind, _, n in kinds if kind != GROUP), enrollment_groups=groups,
            disabled_enrollments=sum(int(n) for _, status, n in kinds if status != "enabled"),
            provisioned=int(provisioned), operations={str(status): int(n) for status, n in operations})
