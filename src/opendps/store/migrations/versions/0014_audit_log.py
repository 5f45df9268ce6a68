"""audit log: every issuance, revocation, CA and enrollment change and registration outcome, as a hash chain

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 10:00:00

``seq`` is the appender's (1, 2, 3... under a lock, see ``opendps.audit``), not a sequence or AUTOINCREMENT: a
gap then means a deleted entry. Indexes serve ``GET /auditLog``'s filters (time, namespace, device); entries are
only ever inserted, so they cost the append a little and nothing else.
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(128), nullable=True),
        sa.Column("namespace", sa.String(64), nullable=True, index=True),
        sa.Column("device_id", sa.String(128), nullable=True, index=True),
        sa.Column("subject", sa.String(256), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_log")
