"""asyncpg connections and pools with vramq's codecs (json/jsonb as Python objects)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from db.dsn import plain_dsn


async def init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
        )


async def connect(dsn: str, *, connect_timeout_s: float = 10.0, **kwargs: Any) -> asyncpg.Connection:
    conn = await asyncpg.connect(plain_dsn(dsn), timeout=connect_timeout_s, **kwargs)
    await init_connection(conn)
    return conn


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook. asyncpg's default sends a reset query (RESET ALL, UNLISTEN *, unlock all
    advisory locks) every time a connection goes back to the pool: one more round trip per use. vramq
    keeps no session state on pooled connections (LISTEN and the leader's lock use dedicated ones), and
    asyncpg still rolls back any open transaction before calling this."""


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    connect_timeout_s: float = 10.0,
    command_timeout: float | None = 30.0,
    **kwargs: Any,
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        plain_dsn(dsn),
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout_s,
        command_timeout=command_timeout,
        init=init_connection,
        reset=_keep_session,
        **kwargs,
    )
    assert pool is not None
    return pool
