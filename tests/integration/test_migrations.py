"""The alembic migrations build exactly the schema the code uses (tasks/io/schema.py), and go back down again.

A scratch database on the embedded PostgreSQL: upgrade to head, compare with the SQLAlchemy metadata (alembic's own
autogenerate comparison: a column, index or type in schema.py that no migration creates shows up as a difference),
then downgrade to base, which must leave no table of ours behind.
"""

import pytest
from sqlalchemy import create_engine, inspect, text

from tasks.devstack import stack
from tasks.io import db, schema
from tests.conftest import SETTINGS

pytestmark = pytest.mark.integration
VERSION_TABLE = "alembic_version_platform"  # tasks/io/migrations/env.py


def engine_for(url: str, **kwargs):
    return create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1), **kwargs)


@pytest.fixture
def scratch_url(services, uid):
    name = f"ecb_migrations_{uid}"
    admin = engine_for(stack.db_url(SETTINGS, "postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield stack.db_url(SETTINGS, name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_migrations_match_the_schema_and_downgrade_cleanly(scratch_url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    head = db.migrate(scratch_url)
    assert head == db.migrate(scratch_url)  # a second upgrade is a no-op
    engine = engine_for(scratch_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
            diffs = compare_metadata(ctx, schema.metadata)
            assert diffs == [], diffs
            assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == head
        command.downgrade(db.alembic_config(scratch_url), "base")
        left = set(inspect(engine).get_table_names()) & set(schema.metadata.tables)
        assert left == set(), left
    finally:
        engine.dispose()
