"""Probes and metrics: ``/healthz`` (the process), ``/readyz`` (database and schema), ``/metrics``.

Metrics are read from the database at scrape time (a collector over one consistent set of reads), so
any replica, and any uvicorn worker of it, reports the same numbers; nothing is counted in process
memory. Job counts and durations cover the jobs the table still holds (the retention window).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import asyncpg
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from api.deps import StateDep
from api.errors import DatabaseUnavailable, error_response
from api.routes.system import live_view
from api.schemas import Health
from db import catalog

router = APIRouter(tags=["health"])

DURATION_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_MB = 1024 * 1024


@router.get("/healthz", response_model=Health, summary="The process is up (no database check)")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Ready: the database answers and its schema is at this build's migration head",
    responses={503: {"description": "not ready"}},
)
async def readyz(state: StateDep) -> Response:
    try:
        revision = await catalog.migration_version(state.db)
    except DatabaseUnavailable as exc:
        return error_response(exc.status, "not_ready", exc.message, headers=exc.headers)
    except asyncpg.UndefinedTableError:
        revision = None
    if revision != state.migration_head:
        return error_response(
            503,
            "not_ready",
            "the database schema is not at this build's revision; run `vramq migrate`",
            details={"revision": revision, "expected": state.migration_head},
            headers={"Retry-After": "5"},
        )
    body = Health(status="ready", revision=revision, listener=state.listener.connected.is_set())
    return JSONResponse(body.model_dump())


def _histogram(
    name: str, doc: str, rows: Sequence[Mapping[str, Any]], labels: Sequence[str]
) -> HistogramMetricFamily:
    """Turn width_bucket rows (bucket index per row) into cumulative Prometheus buckets."""
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    series: dict[tuple[str, ...], tuple[list[int], float]] = {}
    n_bounds = len(DURATION_BUCKETS_S)
    for r in rows:
        key = (catalog.lane(r["model"], r["feature"]), *([r["status"]] if "status" in labels else []))
        counts, total = series.get(key, ([0] * (n_bounds + 1), 0.0))
        # width_bucket: 0 below the first bound, i when bounds[i-1] <= d < bounds[i], n above the last.
        counts[min(int(r["bucket"]), n_bounds)] += int(r["n"])
        series[key] = (counts, total + float(r["total"] or 0.0))
    for key, (counts, total) in sorted(series.items()):
        cumulative, acc = [], 0
        for i, bound in enumerate(DURATION_BUCKETS_S):
            acc += counts[i]
            cumulative.append((str(bound), acc))
        cumulative.append(("+Inf", acc + counts[n_bounds]))
        fam.add_metric(list(key), cumulative, total)
    return fam


class _DatabaseCollector(Collector):
    """Yields metric families built from rows read just before the scrape is rendered."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        yield from self.families


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@router.get(
    "/metrics",
    summary="Prometheus metrics, read from the database at scrape time",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(state: StateDep) -> Response:
    db = state.db
    counts = await catalog.job_counts(db)
    runs = await catalog.durations(db, buckets=DURATION_BUCKETS_S, kind="run")
    waits = await catalog.durations(db, buckets=DURATION_BUCKETS_S, kind="wait")
    view = await live_view(db, state.settings)

    depth = GaugeMetricFamily("vramq_queue_depth", "Queued jobs per model", labels=["model"])
    running = GaugeMetricFamily("vramq_jobs_running", "Leased or running jobs per model", labels=["model"])
    jobs = GaugeMetricFamily(
        "vramq_jobs",
        "Jobs in the table per model and status (within the retention)",
        labels=["model", "status"],
    )
    queued: dict[str, int] = {}
    active: dict[str, int] = {}
    by_status: dict[tuple[str, str], int] = {}
    for r in counts:
        model = catalog.lane(r["model"], r["feature"])
        n = int(r["n"])
        by_status[(model, r["status"])] = by_status.get((model, r["status"]), 0) + n
        if r["status"] == "queued":
            queued[model] = queued.get(model, 0) + n
        elif r["status"] in ("leased", "running"):
            active[model] = active.get(model, 0) + n
    for spec in state.registry:
        queued.setdefault(spec.id, 0)
        active.setdefault(spec.id, 0)
    for model, n in sorted(queued.items()):
        depth.add_metric([model], n)
    for model, n in sorted(active.items()):
        running.add_metric([model], n)
    for (model, status), n in sorted(by_status.items()):
        jobs.add_metric([model, status], n)

    leader_age = GaugeMetricFamily(
        "vramq_leader_heartbeat_age_seconds",
        "Seconds since the pool leader's last heartbeat",
        labels=["pool"],
    )
    leader_term = GaugeMetricFamily("vramq_leader_term", "The pool leader's term", labels=["pool"])
    for leader in view.leaders:
        leader_age.add_metric([leader.pool], leader.heartbeat_age_s)
        leader_term.add_metric([leader.pool], leader.term)

    gpu_labels = ["pool", "gpu", "name"]
    gpu_fams = {
        "total_mb": GaugeMetricFamily("vramq_gpu_memory_total_bytes", "GPU memory", labels=gpu_labels),
        "free_mb": GaugeMetricFamily("vramq_gpu_memory_free_bytes", "Free GPU memory", labels=gpu_labels),
        "used_mb": GaugeMetricFamily("vramq_gpu_memory_used_bytes", "Used GPU memory", labels=gpu_labels),
        "ledger_mb": GaugeMetricFamily(
            "vramq_gpu_memory_ledger_bytes", "GPU memory the scheduler's ledger holds", labels=gpu_labels
        ),
    }
    util = GaugeMetricFamily("vramq_gpu_utilization_percent", "GPU utilization", labels=gpu_labels)
    temp = GaugeMetricFamily("vramq_gpu_temperature_celsius", "GPU temperature", labels=gpu_labels)
    for g in view.gpus:
        labels = [str(g.get("pool", "")), str(g.get("id", "")), str(g.get("name", ""))]
        for key, fam in gpu_fams.items():
            v = _num(g.get(key))
            if v is not None:
                fam.add_metric(labels, v * _MB)
        for key, fam in (("utilization_pct", util), ("temperature_c", temp)):
            v = _num(g.get(key))
            if v is not None:
                fam.add_metric(labels, v)
    workers = GaugeMetricFamily("vramq_workers", "Worker processes", labels=["pool", "model", "state"])
    per_worker: dict[tuple[str, str, str], int] = {}
    for w in view.workers:
        wkey = (str(w.get("pool", "")), str(w.get("model", "")), str(w.get("state", "")))
        per_worker[wkey] = per_worker.get(wkey, 0) + 1
    for wkey, n in sorted(per_worker.items()):
        workers.add_metric(list(wkey), n)

    families: list[Any] = [
        depth,
        running,
        jobs,
        leader_age,
        leader_term,
        *gpu_fams.values(),
        util,
        temp,
        workers,
    ]
    families.append(
        _histogram("vramq_job_run_seconds", "Run time of finished jobs", runs, ["model", "status"])
    )
    families.append(_histogram("vramq_job_wait_seconds", "Queue wait of started jobs", waits, ["model"]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DatabaseCollector(families))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
