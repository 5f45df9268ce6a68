"""certificate revocation: when and why an issued certificate was revoked

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 07:00:00

The hub reads both columns with the row it already reads on every CONNECT (by SHA-256), so no index is needed;
listing a device's certificates uses the existing registration_id index.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable columns: a plain ADD COLUMN on both backends (no table copy)
    op.add_column("issued_certificates", sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("issued_certificates", sa.Column("revocation_reason", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("issued_certificates") as batch:
        batch.drop_column("revocation_reason")
        batch.drop_column("revoked_at")
