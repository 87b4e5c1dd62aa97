"""chat: time to first token, longer model version names, client address

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 19:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

VERSIONED = ("conversations", "messages", "feedback")


def upgrade() -> None:
    op.add_column('messages', sa.Column('ttft_ms', sa.Float(), nullable=True))
    op.add_column('messages', sa.Column('finish_reason', sa.String(16), nullable=True))
    for table in VERSIONED:  # local folders and registry aliases make longer names than a version number
        op.alter_column(table, 'model_version', type_=sa.String(128), existing_type=sa.String(32))


def downgrade() -> None:
    for table in VERSIONED:
        op.alter_column(table, 'model_version', type_=sa.String(32), existing_type=sa.String(128))
    op.drop_column('messages', 'finish_reason')
    op.drop_column('messages', 'ttft_ms')
