"""Upgrade the platform results schema to the newest Alembic revision (safe to run any number of times).

    python -m tasks migrate --run-id R
"""

from __future__ import annotations

from tasks.context import StepContext
from tasks.io import db


def run(ctx: StepContext) -> dict:
    return {"schema_revision": db.migrate()}
