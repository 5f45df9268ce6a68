"""device plane

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 11:04:36.667284
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "linked_hubs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("host_name", sa.String(length=255), nullable=False),
        sa.Column("allocation_weight", sa.Integer(), nullable=False),
        sa.Column("apply_allocation_policy", sa.Boolean(), nullable=False),
        sa.Column("etag", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("host_name"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "operations",
        sa.Column("operation_id", sa.String(length=96), nullable=False),
        sa.Column("registration_key", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("operation_id"),
    )
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_operations_registration_key"), ["registration_key"], unique=False)

    op.create_table(
        "registrations",
        sa.Column("registration_key", sa.String(length=128), nullable=False),
        sa.Column("registration_id", sa.String(length=128), nullable=False),
        sa.Column("enrollment_kind", sa.String(length=16), nullable=False),
        sa.Column("enrollment_id", sa.String(length=128), nullable=False),
        sa.Column("attestation_type", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=True),
        sa.Column("assigned_hub", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("substatus", sa.String(length=48), nullable=True),
        sa.Column("error_code", sa.Integer(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("certificate_serial", sa.String(length=64), nullable=True),
        sa.Column("etag", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("registration_key"),
    )
    with op.batch_alter_table("registrations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_registrations_enrollment_id"), ["enrollment_id"], unique=False)

    op.create_table(
        "hub_devices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("hub_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("device_key", sa.String(length=128), nullable=False),
        sa.Column("auth_type", sa.String(length=32), nullable=False),
        sa.Column("primary_thumbprint", sa.String(length=64), nullable=True),
        sa.Column("secondary_thumbprint", sa.String(length=64), nullable=True),
        sa.Column("secret", sa.LargeBinary(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("generation_id", sa.String(length=32), nullable=False),
        sa.Column("etag", sa.String(length=64), nullable=False),
        sa.Column("twin_tags", sa.JSON(), nullable=False),
        sa.Column("twin_desired", sa.JSON(), nullable=False),
        sa.Column("twin_reported", sa.JSON(), nullable=False),
        sa.Column("desired_version", sa.Integer(), nullable=False),
        sa.Column("reported_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["hub_id"], ["linked_hubs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hub_id", "device_key", name="uq_hub_device"),
    )
    op.create_table(
        "device_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("namespace_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("device_key", sa.String(length=128), nullable=False),
        sa.Column("registration_id", sa.String(length=128), nullable=False),
        sa.Column("hub_host_name", sa.String(length=255), nullable=False),
        sa.Column("policy_id", sa.Integer(), nullable=True),
        sa.Column("certificate_serial", sa.String(length=64), nullable=True),
        sa.Column("certificate_sha256", sa.String(length=64), nullable=True),
        sa.Column("certificate_not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("etag", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["namespace_id"], ["namespaces.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["policy_id"], ["policies.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("namespace_id", "device_key", name="uq_device_record"),
    )
    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("secret", sa.LargeBinary(), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.drop_column("secret")

    op.drop_table("device_records")
    op.drop_table("hub_devices")
    with op.batch_alter_table("registrations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_registrations_enrollment_id"))

    op.drop_table("registrations")
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operations_registration_key"))

    op.drop_table("operations")
    op.drop_table("linked_hubs")
