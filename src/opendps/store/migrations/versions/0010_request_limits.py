"""request limits shared by every process and node (polls and attested registrations per registration id)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 06:00:00

The DPS request limits were kept in each process's memory, so N processes gave a device N times its allowance;
each (limit, registration id) now has one row with its latest arrival times, updated by one atomic upsert.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_limits",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("registration_key", sa.String(128), primary_key=True),
        sa.Column("arrivals", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("request_limits")
