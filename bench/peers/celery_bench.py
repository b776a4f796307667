"""Celery with the Redis broker: the common workloads (see bench/common.py).

    bench/.venv-celery/bin/python bench/peers/celery_bench.py --workload drain --out results.jsonl

Worker: one ``celery worker`` process, solo pool (no-op tasks gain nothing from
forking on 2 cores), gossip/mingle/heartbeat off, results ignored, acks on receipt
(default). ``enqueue_bulk`` publishes a ``group`` of signatures through one producer
(Celery has no multi-message publish). Uses Redis db 10 (flushed before every run)
unless ``--redis`` names a db.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

SYSTEM = "celery"
REDIS_DB = 10
WORKER_CONFIG = {
    "pool": "solo",
    "concurrency": 1,
    "prefetch_multiplier": 64,  # docs: raise it for many short tasks (default 4)
    "acks_late": False,  # default
    "ignore_result": True,
    "without": ["gossip", "mingle", "heartbeat"],
}


def _version() -> str:
    from importlib.metadata import version

    return version("celery")


def make_app(url: str, record: bool):
    from celery import Celery

    app = Celery("bench", broker=url)
    app.conf.update(
        task_ignore_result=WORKER_CONFIG["ignore_result"],
        task_acks_late=WORKER_CONFIG["acks_late"],
        worker_prefetch_multiplier=WORKER_CONFIG["prefetch_multiplier"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    rec = common.Recorder.from_env() if record else None

    @app.task(name="noop")
    def noop(i: int) -> None:  # the job body
        t = time.time()
        rec.record(i, t)

    return app, noop


# ---------------------------------------------------------------- worker process


def _worker(url: str, cfg: dict) -> None:
    app, _ = make_app(url, record=True)
    argv = [
        "worker",
        f"--pool={cfg['pool']}",
        f"--concurrency={cfg['concurrency']}",
        f"--prefetch-multiplier={cfg['prefetch_multiplier']}",
        "--loglevel=WARNING",
    ] + [f"--without-{w}" for w in cfg["without"]]
    app.worker_main(argv)  # SIGTERM: warm shutdown


# ---------------------------------------------------------------- runner


class Client:
    def __init__(self, url: str):
        self.app, self.task = make_app(url, record=False)

    def reset(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.default_channel.client.flushdb()

    def enqueue_one(self, i: int) -> None:
        self.task.apply_async((i,))

    def enqueue_many(self, ids: list[int]) -> None:
        from celery import group

        group(self.task.s(i) for i in ids).apply_async()


def _spawn(url: str, rdir: Path) -> common.Worker:
    argv = [
        sys.executable,
        __file__,
        "--worker",
        "--redis",
        url,
        "--worker-config",
        json.dumps(WORKER_CONFIG),
    ]
    return common.Worker(argv, env=common.worker_env(rdir), log_path=rdir / "worker.log")


async def _run(workload: str, url: str, args, rdir: Path) -> tuple[float | None, dict, dict]:
    params: dict = {
        "version": _version(),
        "client": "task.apply_async",
        "redis_db": url.rsplit("/", 1)[-1],
    }
    c = Client(url)
    c.reset()
    c.enqueue_one(common.PROBE)  # open the broker connection outside the timed loop
    c.reset()
    return await common.run_workload(
        workload,
        args,
        rdir,
        params,
        enqueue_one=c.enqueue_one,
        enqueue_many=c.enqueue_many,
        spawn=lambda: _spawn(url, rdir),
        worker_params=WORKER_CONFIG,
        bulk_client="group(...).apply_async",
    )


def _redis_version(url: str) -> str:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return str(r.info("server").get("redis_version"))
    finally:
        r.close()


def main() -> int:
    args = common.runner_parser(SYSTEM, __doc__).parse_args()
    if args.worker_config:
        WORKER_CONFIG.update(json.loads(args.worker_config))
    WORKER_CONFIG.update(common.parse_sets(args.set, WORKER_CONFIG))
    url = common.redis_url_with_db(args.redis, REDIS_DB)
    if args.worker:
        _worker(url, json.loads(args.worker_config))
        return 0

    def run_one(workload: str, rep: int) -> tuple[float | None, dict, dict, dict]:
        with common.record_dir(SYSTEM) as rdir:
            value, extra, params = asyncio.run(_run(workload, url, args, rdir))
        return value, extra, params, common.run_info(rep, redis={"version": _redis_version(url)})

    return common.run_all(SYSTEM, args, run_one)


if __name__ == "__main__":
    sys.exit(main())
