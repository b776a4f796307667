"""System status: the leader of each pool, its GPUs and workers, and the queue, from the database only
(the leaders write their snapshots there), so every replica gives the same answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter

from api.deps import DbDep, ReadDep, SettingsDep
from api.errors import ErrorBody
from api.schemas import Leader, SystemStatus
from core.settings import Settings
from db import catalog
from db.queue import Executor

router = APIRouter(prefix="/api/v1/system", tags=["system"])


def stale_after_s(settings: Settings) -> float:
    """A leader whose heartbeat is older than this is reported stale (dead, or cut off)."""
    return max(5 * settings.heartbeat_interval_s, 10.0)


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


@dataclass(frozen=True)
class LiveView:
    leaders: list[Leader]
    gpus: list[dict[str, Any]]
    workers: list[dict[str, Any]]


async def live_view(db: Executor, settings: Settings) -> LiveView:
    """The live term of every pool with its snapshot's GPUs and workers (each tagged with its pool)."""
    rows = await catalog.live_terms(db, stale_after_s=stale_after_s(settings))
    leaders: list[Leader] = []
    gpus: list[dict[str, Any]] = []
    workers: list[dict[str, Any]] = []
    for r in rows:
        snap = r["snapshot"] if isinstance(r["snapshot"], dict) else {}
        leaders.append(
            Leader(
                pool=r["pool"],
                term=r["term"],
                host=r["host"],
                pid=r["pid"],
                since=r["started_at"],
                heartbeat_at=r["heartbeat_at"],
                heartbeat_age_s=max(0.0, float(r["heartbeat_age_s"] or 0.0)),
                stale=bool(r["stale"]),
                reservation=snap.get("reservation"),
            )
        )
        gpus.extend({**g, "pool": r["pool"], "stale": bool(r["stale"])} for g in _dicts(snap.get("gpus")))
        workers.extend(
            {**w, "pool": r["pool"], "stale": bool(r["stale"])} for w in _dicts(snap.get("workers"))
        )
    return LiveView(leaders, gpus, workers)


@router.get(
    "/status",
    response_model=SystemStatus,
    summary="Leaders, GPUs, workers and queue depth of every pool",
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
async def system_status(db: DbDep, settings: SettingsDep, principal: ReadDep) -> SystemStatus:
    view = await live_view(db, settings)
    depth = await catalog.queue_depth(db)
    return SystemStatus(leaders=view.leaders, gpus=view.gpus, workers=view.workers, queue=depth)
