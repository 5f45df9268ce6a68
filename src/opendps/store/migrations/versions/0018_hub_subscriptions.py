"""hub sessions' subscriptions kept across clean-session-0 reconnects

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 21:20:00

``hub_devices.subscriptions``: the topic filters a device's last clean-session-0 MQTT session held, as a bit mask
over the hub's few allowed filters (``frontends.mqtt.hub.KEPT_FILTERS``; bit 8 + i: granted QoS 1). IoT Hub keeps a
session's subscriptions, and Microsoft's Node.js SDK relies on it: its SAS renewal reconnects with clean session 0 and
does not subscribe again. Kept in the store, not in a process, because the reconnect may reach another worker or
node. 0: none (a clean-session-1 CONNECT clears it).
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hub_devices") as batch:
        batch.add_column(sa.Column("subscriptions", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("hub_devices") as batch:
        batch.drop_column("subscriptions")
