"""Alembic environment: synchronous psycopg 3, URL from ``-x url=``, the config, or vramq's settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from db.dsn import sqlalchemy_url
from db.schema import metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    x = context.get_x_argument(as_dictionary=True)
    url = x.get("url") or config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from db.embedded import resolve_dsn

        url = resolve_dsn()
    return sqlalchemy_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
