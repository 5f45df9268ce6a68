"""lookup indexes found by the store-scale benchmark (1M registrations)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 18:20:00

* operations.created_at: the 24 h sweep (``DELETE ... WHERE created_at < ?``) no longer scans the table;
* registrations (device_id, assigned_hub): renewal through the hub found the registration by a full scan;
* enrollments (kind, lower(enrollment_id)): ids match case-insensitively, so the unique constraint on the
  raw id could not serve the lookup every registration and poll makes.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_operations_created_at", "operations", ["created_at"])
    op.create_index("ix_registrations_device_hub", "registrations", ["device_id", "assigned_hub"])
    op.create_index("ix_enrollments_kind_lower_id", "enrollments", ["kind", sa.text("lower(enrollment_id)")])


def downgrade() -> None:
    op.drop_index("ix_enrollments_kind_lower_id", table_name="enrollments")
    op.drop_index("ix_registrations_device_hub", table_name="registrations")
    op.drop_index("ix_operations_created_at", table_name="operations")
