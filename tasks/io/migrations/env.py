"""Alembic environment for the platform results database (URL from ECB_RESULTS_DB_URL or the caller)."""

from alembic import context
from sqlalchemy import create_engine, pool

from tasks import env as ecb_env  # this file is alembic's "env.py"; tasks.env is the environment registry
from tasks.io.schema import metadata

config = context.config
VERSION_TABLE = "alembic_version_platform"  # not alembic's default: the database may be shared with another app
url = config.get_main_option("sqlalchemy.url") or ecb_env.require("ECB_RESULTS_DB_URL", "the migrations need the "
                                                                                     "platform database")


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=metadata, literal_binds=True, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
