"""PKCS#11 key custody: a CA key on an HSM token is referenced, not stored

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 11:00:00

``wrapped_keys`` rows with backend ``pkcs11`` hold no private material (an empty ``blob``) and the public key in
clear, as before; these columns say where the key is: the token's label and the key objects' CKA_LABEL and CKA_ID
(hex). Nullable: software keys have none. A plain ADD COLUMN on both backends (no table copy).
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("wrapped_keys", sa.Column("pkcs11_token", sa.String(32), nullable=True))
    op.add_column("wrapped_keys", sa.Column("pkcs11_label", sa.String(64), nullable=True))
    op.add_column("wrapped_keys", sa.Column("pkcs11_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("wrapped_keys") as batch:
        batch.drop_column("pkcs11_id")
        batch.drop_column("pkcs11_label")
        batch.drop_column("pkcs11_token")
