"""certificate lifecycle: revoked issuing CAs, superseded certificates, CRL freshness per policy

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 08:00:00

- ``certificate_authorities.revoked_at`` / ``revocation_reason``: an issuing CA revoked by its root (key
  compromise: rotate, then revoke the old one); the root's CRL lists it and hubs stop trusting it.
- ``policies.revoke_superseded``: when a device first connects with a renewed certificate, its older ones are
  revoked as ``superseded`` (default on; off keeps Azure's behaviour: an old certificate works until it expires).
- ``policies.crl_validity_hours``: how far ahead a CRL's nextUpdate (and an OCSP response's) lies.
- ``issued_certificates.first_used_at``: the first hub CONNECT with the certificate; the superseding step runs
  once per certificate, so later CONNECTs pay nothing for it.

Every column is nullable or has a server default: a plain ADD COLUMN on both backends (no table copy).
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("certificate_authorities", sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("certificate_authorities", sa.Column("revocation_reason", sa.String(32), nullable=True))
    op.add_column("policies", sa.Column("revoke_superseded", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.add_column("policies", sa.Column("crl_validity_hours", sa.Integer(), nullable=False, server_default="24"))
    op.add_column("issued_certificates", sa.Column("first_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("issued_certificates") as batch:
        batch.drop_column("first_used_at")
    with op.batch_alter_table("policies") as batch:
        batch.drop_column("crl_validity_hours")
        batch.drop_column("revoke_superseded")
    with op.batch_alter_table("certificate_authorities") as batch:
        batch.drop_column("revocation_reason")
        batch.drop_column("revoked_at")
