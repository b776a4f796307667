"""procrastinate on PostgreSQL: the common workloads (see bench/common.py).

    bench/.venv-peers/bin/python bench/peers/procrastinate_bench.py --workload drain --out results.jsonl

Worker: one process, ``App.run_worker_async(concurrency=10)`` over a psycopg pool
of 12 connections (the default pool of 4 would starve 10 concurrent sub-workers),
LISTEN/NOTIFY on (default). Clients defer with ``defer_async`` / ``batch_defer_async``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

SYSTEM = "procrastinate"
TASK = "noop"
WORKER_CONFIG = {
    "concurrency": 10,
    "pool_max_size": 12,  # > concurrency, else sub-workers wait for connections
    "listen_notify": True,  # default
    "fetch_job_polling_interval_s": 5.0,  # default; NOTIFY wakes idle sub-workers
    "delete_jobs": "never",  # default
}


def _version() -> str:
    from importlib.metadata import version

    return version("procrastinate")


def _app(dsn: str, pool_min: int, pool_max: int):
    import logging

    import procrastinate

    # Tasks are registered under explicit names, so defining the app in the script
    # that runs it is harmless; drop the warning that says otherwise.
    logging.getLogger("procrastinate.blueprints").addFilter(
        lambda rec: getattr(rec, "action", None) != "app_defined_in___main__"
    )

    connector = procrastinate.PsycopgConnector(conninfo=dsn, min_size=pool_min, max_size=pool_max)
    app = procrastinate.App(connector=connector)
    return app


# ---------------------------------------------------------------- worker process


async def _worker(dsn: str, cfg: dict) -> None:
    rec = common.Recorder.from_env()
    app = _app(dsn, cfg["pool_max_size"], cfg["pool_max_size"])

    @app.task(name=TASK)
    async def noop(i: int) -> None:  # the job body
        t = time.time()
        rec.record(i, t)

    async with app.open_async():
        # install_signal_handlers (default): SIGTERM/SIGINT stop the worker gracefully
        await app.run_worker_async(
            concurrency=cfg["concurrency"],
            listen_notify=cfg["listen_notify"],
            fetch_job_polling_interval=cfg["fetch_job_polling_interval_s"],
            delete_jobs=cfg["delete_jobs"],
        )


# ---------------------------------------------------------------- runner


class Client:
    def __init__(self, dsn: str):
        self.app = _app(dsn, 1, 1)

        @self.app.task(name=TASK)
        async def noop(i: int) -> None:  # never runs in the client
            pass

        self.task = noop

    async def __aenter__(self) -> Client:
        await self.app.open_async()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.app.close_async()

    async def install(self) -> None:
        await self.app.schema_manager.apply_schema_async()

    async def enqueue_one(self, i: int) -> None:
        await self.task.defer_async(i=i)

    async def enqueue_many(self, ids: list[int]) -> None:
        await self.task.batch_defer_async(*({"i": i} for i in ids))


def _spawn(dsn: str, rdir: Path) -> common.Worker:
    argv = [sys.executable, __file__, "--worker", "--dsn", dsn, "--worker-config", json.dumps(WORKER_CONFIG)]
    return common.Worker(argv, env=common.worker_env(rdir), log_path=rdir / "worker.log")


async def _run(workload: str, dsn: str, args, rdir: Path) -> tuple[float | None, dict, dict]:
    params: dict = {"version": _version(), "client": "psycopg, pool of 1"}
    async with Client(dsn) as c:
        await c.install()
        return await common.run_workload(
            workload,
            args,
            rdir,
            params,
            enqueue_one=c.enqueue_one,
            enqueue_many=c.enqueue_many,
            spawn=lambda: _spawn(dsn, rdir),
            worker_params=WORKER_CONFIG,
        )


def main() -> int:
    args = common.runner_parser(SYSTEM, __doc__).parse_args()
    if args.worker_config:
        WORKER_CONFIG.update(json.loads(args.worker_config))
    WORKER_CONFIG.update(common.parse_sets(args.set, WORKER_CONFIG))
    if args.worker:
        asyncio.run(_worker(args.dsn, json.loads(args.worker_config)))
        return 0

    def run_one(workload: str, rep: int) -> tuple[float | None, dict, dict, dict]:
        with (
            common.fresh_db(args.dsn, common.db_name(SYSTEM, workload), keep=args.keep_db) as dsn,
            common.record_dir(SYSTEM) as rdir,
        ):
            value, extra, params = asyncio.run(_run(workload, dsn, args, rdir))
            return value, extra, params, common.run_info(rep, postgres=common.pg_server_info(dsn))

    return common.run_all(SYSTEM, args, run_one)


if __name__ == "__main__":
    sys.exit(main())
