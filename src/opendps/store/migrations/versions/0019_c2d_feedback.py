"""cloud-to-device feedback records

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-08 10:00:00

``c2d_feedback``: the outcome of a cloud-to-device message whose sender asked for feedback (``iothub-ack`` positive,
negative or full): Success (the device acknowledged it), Expired, DeliveryCountExceeded, Purged. IoT Hub hands these to
a service's receiver on ``/messages/servicebound/feedback``, which completes (deletes) them; a record is locked by one
delivery (``lock_token`` until ``locked_until``) and delivered again if it is not completed. Kept in the store because
any worker or node may serve the receiver; bounded by an expiry (1 hour, IoT Hub's default feedback TTL) and a cap
per hub. Indexed by hub and id: a receiver takes its hub's oldest records.
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "c2d_feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("hub_id", sa.Integer(), sa.ForeignKey("linked_hubs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("generation_id", sa.String(32), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lock_token", sa.String(32), nullable=True),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_c2d_feedback_hub", "c2d_feedback", ["hub_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_c2d_feedback_hub", table_name="c2d_feedback")
    op.drop_table("c2d_feedback")
