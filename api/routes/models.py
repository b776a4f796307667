"""Models: the registry, with each model's warm instances (from the leaders' snapshots) and queue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import DbDep, ReadDep, RegistryDep, SettingsDep
from api.errors import ErrorBody
from api.routes.system import live_view
from api.schemas import Instance, ModelList, ModelPublic
from db import catalog

router = APIRouter(prefix="/api/v1/models", tags=["models"])


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@router.get(
    "",
    response_model=ModelList,
    summary="The models this deployment serves",
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
async def list_models(
    db: DbDep, registry: RegistryDep, settings: SettingsDep, principal: ReadDep
) -> ModelList:
    view = await live_view(db, settings)
    depth = await catalog.queue_depth(db)
    items = []
    for spec in registry:
        instances = [
            Instance(
                pool=str(w["pool"]),
                worker=str(w["id"]) if w.get("id") is not None else None,
                gpu=str(w["gpu"]) if w.get("gpu") is not None else None,
                state=str(w["state"]) if w.get("state") is not None else None,
                vram_mb=_num(w.get("vram_mb")),
                jobs_done=int(w["jobs_done"]) if isinstance(w.get("jobs_done"), int) else None,
            )
            for w in view.workers
            if w.get("model") == spec.id and not w.get("stale")
        ]
        pub = spec.public()
        items.append(
            ModelPublic(
                **pub,
                file_inputs=sorted(spec.file_inputs),
                queued=depth.get(spec.id, 0),
                instances=instances,
            )
        )
    return ModelList(items=items)
