"""the configuration generation counter

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 23:30:00

Registrations read enrollments, policies, issuing CAs and hubs that change rarely; each process caches what it
derives from them while this counter (bumped by every change to those rows) stays the same.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "config_generation",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(table, [{"id": 1, "value": 0}])


def downgrade() -> None:
    op.drop_table("config_generation")
