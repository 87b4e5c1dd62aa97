"""canary releases: share, start, verdict and who/why of a decision on releases; messages by time

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('releases', sa.Column('canary_share', sa.Float(), nullable=True))
    op.add_column('releases', sa.Column('canary_started_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('releases', sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('releases', sa.Column('verdict', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('releases', sa.Column('actor', sa.String(128), nullable=True))
    op.add_column('releases', sa.Column('reason', sa.Text(), nullable=True))
    op.create_index('ix_messages_created_at', 'messages', ['created_at'])


def downgrade() -> None:
    op.drop_index('ix_messages_created_at', table_name='messages')
    for column in ('reason', 'actor', 'verdict', 'decided_at', 'canary_started_at', 'canary_share'):
        op.drop_column('releases', column)
