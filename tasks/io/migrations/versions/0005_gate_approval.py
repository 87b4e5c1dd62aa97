"""gate approval: a person's answer to the approve_release task, who gave it, when, why it was asked

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

COLUMNS = ('approval_status', 'approval_reason', 'approval_by', 'approval_comment', 'approval_at')


def upgrade() -> None:
    # approved / rejected / timed_out; NULL = nobody was asked (the gate's own verdict stood)
    op.add_column('gate_decisions', sa.Column('approval_status', sa.String(16), nullable=True))
    op.add_column('gate_decisions', sa.Column('approval_reason', sa.Text(), nullable=True))
    op.add_column('gate_decisions', sa.Column('approval_by', sa.String(250), nullable=True))
    op.add_column('gate_decisions', sa.Column('approval_comment', sa.Text(), nullable=True))
    op.add_column('gate_decisions', sa.Column('approval_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_column('gate_decisions', column)
