"""Access to the platform results database and its migrations.

    python -m tasks migrate            # alembic upgrade head on $ECB_RESULTS_DB_URL

Connections use pool_pre_ping so a step survives a PostgreSQL restart between statements.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def results_url() -> str:
    url = os.environ.get("ECB_RESULTS_DB_URL")
    if not url:
        raise RuntimeError("ECB_RESULTS_DB_URL is not set: point it at the platform database "
                           "(`ecb stack up` writes it to .ecb/stack.env)")
    return url


@lru_cache(maxsize=4)
def _engine(url: str) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1), pool_pre_ping=True,
                         pool_size=2, max_overflow=2)


def engine() -> Engine:
    return _engine(results_url())


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str | None = None) -> str:
    """Upgrade the schema to the newest revision; returns it. Safe to run any number of times."""
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg = alembic_config(url or results_url())
    command.upgrade(cfg, "head")
    return ScriptDirectory.from_config(cfg).get_current_head()


def upsert(conn, table, row: dict, keys: tuple[str, ...], update: tuple[str, ...] | None = None):
    """INSERT ... ON CONFLICT (keys) DO UPDATE: the same natural key never makes a second row."""
    stmt = insert(table).values(**row)
    cols = update if update is not None else tuple(k for k in row if k not in keys)
    if cols:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    return conn.execute(stmt)


def run(ctx) -> dict:
    return {"schema_revision": migrate()}
