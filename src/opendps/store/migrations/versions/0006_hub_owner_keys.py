"""each hub's own owner keys (iothubowner)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 22:00:00

One ``iothubowner`` key pair used to sign for every hub: a token for one hub could name another. Each hub now
has its own pair, wrapped by the master key like every secret; existing hubs get theirs when the server opens
the store (the default hub keeps the installation's old pair, so its connection strings stay valid).
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("linked_hubs") as batch:
        batch.add_column(sa.Column("owner_keys", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("linked_hubs") as batch:
        batch.drop_column("owner_keys")
