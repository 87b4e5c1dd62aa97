"""Access to the platform results database and its migrations.

    python -m tasks migrate            # alembic upgrade head on $ECB_RESULTS_DB_URL (tasks/steps/migrate.py)

Connections use pool_pre_ping so a step survives a PostgreSQL restart between statements, and steps write through
``transaction(fn)``, which runs the whole transaction again when the connection is lost in the middle of it (server
restarted, connection cut): the server rolled the first attempt back, so nothing is lost or written twice.

    db.transaction(lambda conn: db.upsert(conn, table, row, keys=("run_id",)), what="record the run")

Pool size and retry budget are config fields, set once per process with ``configure(pool_size, retry_s)``: the step
runner passes storage.db_pool_size and storage.db_retry_s, the chat app chat.db_pool_size; without a call the
StorageConfig defaults apply.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Engine

from tasks import env
from tasks.config import StorageConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
log = logging.getLogger("tasks.io.db")
T = TypeVar("T")
_settings = {"pool_size": StorageConfig().db_pool_size, "retry_s": StorageConfig().db_retry_s}


def configure(pool_size: int, retry_s: float) -> None:
    """Use this pool size for engines created from now on and this retry budget for transactions."""
    _settings.update(pool_size=pool_size, retry_s=retry_s)


def results_url() -> str:
    return env.require("ECB_RESULTS_DB_URL", "point it at the platform database (`ecb stack up` writes it to "
                                             ".ecb/stack.env)")


@lru_cache(maxsize=4)
def _engine(url: str, pool_size: int) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1), pool_pre_ping=True,
                         pool_size=pool_size, max_overflow=2, connect_args={"connect_timeout": 10})


def engine() -> Engine:
    return _engine(results_url(), _settings["pool_size"])


def retry_seconds() -> float:
    """How long a transaction keeps retrying while PostgreSQL is unreachable (storage.db_retry_s)."""
    return _settings["retry_s"]


def _where(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


def _retryable(exc: Exception) -> bool:
    """Lost or refused connections (and the server's own rollbacks: deadlock, serialization failure); never a
    constraint violation or a bad statement, which would fail the same way again."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def transaction(fn: Callable[..., T], what: str = "database transaction", retry_s: float | None = None) -> T:
    """Run ``fn(conn)`` in one transaction and return its result; when the connection fails, run it all again on a
    fresh connection (backoff 0.5 s doubling to 5 s) for up to ``retry_s`` seconds (default ``retry_seconds()``).

    ``fn`` must be safe to run twice -- upserts on natural keys, reads -- because a commit whose reply was lost
    cannot be told from one that never reached the server. When the time is up, a StepError names the database.
    """
    from tasks.errors import StepError

    url = results_url()
    deadline = time.monotonic() + (retry_seconds() if retry_s is None else retry_s)
    delay, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            with engine().begin() as conn:
                return fn(conn)
        except Exception as exc:
            if not _retryable(exc):
                raise
            first_line = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            if time.monotonic() + delay > deadline:
                raise StepError(f"{what} failed: PostgreSQL at {_where(url)} unreachable or failing after "
                                f"{attempt} attempt(s): {first_line}") from exc
            log.warning("%s: attempt %d failed (%s); retrying in %.1fs", what, attempt, first_line, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


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

