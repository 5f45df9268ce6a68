"""cluster: nodes (server processes) with heartbeats, messages between them, device presence

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 03:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cluster_nodes",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("worker", sa.Integer(), nullable=False),
        sa.Column("endpoints", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    op.create_table(
        "live_messages",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("target", sa.String(36), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "hub_connections",
        sa.Column("hub_id", sa.Integer(), sa.ForeignKey("linked_hubs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("device_key", sa.String(128), primary_key=True),
        sa.Column("node_id", sa.String(36), sa.ForeignKey("cluster_nodes.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("session", sa.String(36), nullable=False),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("hub_connections")
    op.drop_table("live_messages")
    op.drop_table("cluster_nodes")
