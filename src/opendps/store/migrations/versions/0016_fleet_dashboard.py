"""the fleet dashboard: when each device was last seen, and unrevoked certificates by expiry

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 12:00:00

``hub_devices.last_seen_at``: when a hub session of the device last began or ended, written by presence's batched
write (``opendps.hub.presence``) in the same transaction as its ``hub_connections`` rows; NULL until the device first
connects. A plain ADD COLUMN on both backends (no table copy).

``ix_issued_certificates_expiry`` (not_after) WHERE revoked_at IS NULL: the expiry timeline (how many certificates
expire on each of the next days) is one GROUP BY over a range of this index, so the certificates that expired or
were revoked (a renewal supersedes the old one) are never read, however long the history grows.
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_UNREVOKED = sa.text("revoked_at IS NULL")


def upgrade() -> None:
    op.add_column("hub_devices", sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_issued_certificates_expiry", "issued_certificates", ["not_after"],
                    postgresql_where=_UNREVOKED, sqlite_where=_UNREVOKED)


def downgrade() -> None:
    op.drop_index("ix_issued_certificates_expiry", table_name="issued_certificates")
    with op.batch_alter_table("hub_devices") as batch:
        batch.drop_column("last_seen_at")
