"""certificate status (CRL and OCSP): an issuing CA's revoked certificates, found without reading the others

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 09:00:00

``ix_issued_certificates_revoked`` (issuing_ca_id, revoked_at) WHERE revoked_at IS NOT NULL: a partial index, so it
holds revoked certificates only. Every CRL request asks for its CA's revocation state (count and latest time of
its revoked certificates, at most once a second per process) and a rebuilt CRL lists them; both read this index
alone, whatever the size of the fleet. Issuance inserts rows with revoked_at NULL, so the hot path does not
maintain it. (OCSP finds a certificate by serial, which the unique constraint already indexes.)
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_REVOKED = sa.text("revoked_at IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_issued_certificates_revoked", "issued_certificates", ["issuing_ca_id", "revoked_at"],
                    postgresql_where=_REVOKED, sqlite_where=_REVOKED)


def downgrade() -> None:
    op.drop_index("ix_issued_certificates_revoked", table_name="issued_certificates")
