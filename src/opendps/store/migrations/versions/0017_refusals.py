"""the refusal log: device requests refused lately (issue 19)

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 13:00:00

``refusals``: DPS registrations and hub CONNECTs the service refused, with the id sent, the transport, a bounded
reason word, the error code and message (never a credential), for ``GET /status`` and the dashboard. Owned by
``opendps.audit`` (``audit.refusals``) but not part of the hash chain; kept 24 hours and at most 10,000 rows. Indexed
by ``created_at`` (the last hour's count, the sweep).
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refusals",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("hub", sa.String(255), nullable=True),
        sa.Column("transport", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("error_code", sa.Integer(), nullable=False),
        sa.Column("message", sa.String(512), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_refusals_created_at", "refusals", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_refusals_created_at", table_name="refusals")
    op.drop_table("refusals")
