"""releases.registered_model: a registry version number names a model only together with its registered model

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 12:00:00

``release.registered_model`` can be set per run, so one platform database holds releases of several registered
models, each with its own version 1, 2, ...; the canary and rollback steps look a release row up by (model, version).
Rows written before this revision have NULL: lookups treat them as rows of whatever model asks (the old behaviour).
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('releases', sa.Column('registered_model', sa.String(250), nullable=True))
    op.create_index('ix_releases_model_version', 'releases', ['registered_model', 'registry_version'])


def downgrade() -> None:
    op.drop_index('ix_releases_model_version', table_name='releases')
    op.drop_column('releases', 'registered_model')
