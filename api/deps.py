"""Request dependencies as ``Annotated`` aliases: the database, the caller, settings, the registry.

``AppState`` is what the lifespan builds once per process (``app.state.vramq``); dependencies read it.
The database handle is a thin wrapper over the asyncpg pool that bounds every pool acquisition (an
exhausted or unreachable database answers 503, never a hang) and exists before the pool does: when the
database is down at start-up, routes answer 503 until the background connector succeeds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import asyncpg
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError, DatabaseUnavailable, is_db_outage
from api.listener import JobListener
from core.registry import Registry
from core.settings import Settings
from db import catalog

T = TypeVar("T")

AUTH_CACHE_TTL_S = 5.0
_AUTH_CACHE_MAX = 10_000


class Database:
    """The API's view of the asyncpg pool: ``fetch``/``fetchrow``/``fetchval``/``execute`` with a
    bounded acquire, outages turned into ``DatabaseUnavailable`` (503)."""

    def __init__(self, *, acquire_timeout_s: float) -> None:
        self.pool: asyncpg.Pool | None = None
        self.acquire_timeout_s = acquire_timeout_s

    @property
    def connected(self) -> bool:
        return self.pool is not None

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        pool = self.pool
        if pool is None:
            raise DatabaseUnavailable("the database is not reachable yet; try again shortly")
        try:
            async with pool.acquire(timeout=self.acquire_timeout_s) as conn:
                yield conn
        except ApiError:
            raise
        except Exception as exc:
            if is_db_outage(exc):
                raise DatabaseUnavailable() from exc
            raise

    async def _run(self, fn: Callable[[asyncpg.Connection], Coroutine[Any, Any, T]]) -> T:
        async with self.acquire() as conn:
            return await fn(conn)

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return await self._run(lambda c: c.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self._run(lambda c: c.fetchrow(query, *args))

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._run(lambda c: c.fetchval(query, *args))

    async def execute(self, query: str, *args: Any) -> str:
        return await self._run(lambda c: c.execute(query, *args))


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant and its scopes (``admin`` implies every scope and every tenant)."""

    tenant: str
    scopes: frozenset[str]
    key_id: str | None = None

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return self.admin or scope in self.scopes

    @property
    def tenant_filter(self) -> str | None:
        """The tenant whose rows the caller may see; None for an admin (all of them)."""
        return None if self.admin else self.tenant


DEV_PRINCIPAL = Principal(tenant="default", scopes=frozenset(catalog.SCOPES))


@dataclass
class AppState:
    """Everything one API process holds: built by the lifespan, read by the dependencies."""

    settings: Settings
    registry: Registry
    db: Database
    listener: JobListener
    migration_head: str | None = None
    dsn: str | None = None
    scheduler: Any = None
    _auth_cache: dict[str, tuple[Principal, float]] = field(default_factory=dict)

    def cached_principal(self, secret_hash: str) -> Principal | None:
        hit = self._auth_cache.get(secret_hash)
        if hit is None:
            return None
        principal, expires = hit
        if expires < time.monotonic():
            self._auth_cache.pop(secret_hash, None)
            return None
        return principal

    def cache_principal(self, secret_hash: str, principal: Principal) -> None:
        if len(self._auth_cache) >= _AUTH_CACHE_MAX:
            self._auth_cache.clear()
        self._auth_cache[secret_hash] = (principal, time.monotonic() + AUTH_CACHE_TTL_S)


async def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "vramq", None)
    if not isinstance(state, AppState):
        raise DatabaseUnavailable("the service is starting; try again shortly")
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_db(state: StateDep) -> Database:
    return state.db


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_registry(state: StateDep) -> Registry:
    return state.registry


async def get_listener(state: StateDep) -> JobListener:
    return state.listener


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
ListenerDep = Annotated[JobListener, Depends(get_listener)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <secret>`")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


async def authenticate(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, from its bearer key (one indexed query, cached for a few seconds)."""
    if state.settings.auth == "disabled":
        return DEV_PRINCIPAL
    if credentials is None or not credentials.credentials:
        raise _unauthorized("missing bearer API key")
    secret = credentials.credentials
    if len(secret) > 200:
        raise _unauthorized("invalid API key")
    digest = catalog.hash_secret(secret)
    cached = state.cached_principal(digest)
    if cached is not None:
        return cached
    row = await catalog.lookup_api_key_hash(state.db, digest)
    if row is None:
        raise _unauthorized("invalid or revoked API key")
    principal = Principal(tenant=row["tenant"], scopes=frozenset(row["scopes"]), key_id=str(row["id"]))
    state.cache_principal(digest, principal)
    return principal


AuthDep = Annotated[Principal, Depends(authenticate)]


def require(scope: str) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    async def check(principal: AuthDep) -> Principal:
        if not principal.allows(scope):
            raise ApiError(403, "forbidden", f"this API key lacks the '{scope}' scope")
        return principal

    check.__name__ = f"require_{scope}"
    return check


ReadDep = Annotated[Principal, Depends(require("read"))]
SubmitDep = Annotated[Principal, Depends(require("submit"))]
TenantDep = ReadDep  # the caller allowed to read; ``.tenant_filter`` scopes its queries
