"""arq on Redis: the common workloads (see bench/common.py).

    bench/.venv-peers/bin/python bench/peers/arq_bench.py --workload drain --out results.jsonl

Worker: one ``arq.worker.Worker`` process with ``poll_delay=0.05`` (the default of
0.5 s caps it at about 200 jobs/s and ~270 ms pickup) and ``max_jobs=10`` (default).
arq has no bulk enqueue: ``enqueue_bulk`` is skipped and the drain backlog is
enqueued one job at a time. Uses Redis db 9 (flushed before every run) unless
``--redis`` names a db.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

SYSTEM = "arq"
REDIS_DB = 9
WORKER_CONFIG = {
    "poll_delay_s": 0.05,
    "max_jobs": 10,  # default
    "keep_result_s": 3600,  # default
}


def _version() -> str:
    from importlib.metadata import version

    return version("arq")


def _settings(url: str):
    from arq.connections import RedisSettings

    return RedisSettings.from_dsn(url)


# ---------------------------------------------------------------- worker process


async def noop(ctx, i: int) -> None:  # the job body
    t = time.time()
    _REC.record(i, t)


_REC: common.Recorder | None = None


def _worker(url: str, cfg: dict) -> None:
    global _REC
    from arq.worker import Worker, func

    _REC = common.Recorder.from_env()
    asyncio.set_event_loop(asyncio.new_event_loop())
    w = Worker(
        functions=[func(noop, name="noop")],
        redis_settings=_settings(url),
        poll_delay=cfg["poll_delay_s"],
        max_jobs=cfg["max_jobs"],
        keep_result=cfg["keep_result_s"],
        handle_signals=True,  # SIGTERM/SIGINT: graceful stop
    )
    w.run()


# ---------------------------------------------------------------- runner


class Client:
    def __init__(self, url: str):
        self.url = url

    async def __aenter__(self) -> Client:
        from arq import create_pool

        self.pool = await create_pool(_settings(self.url))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pool.aclose()

    async def reset(self) -> None:
        await self.pool.flushdb()

    async def enqueue_one(self, i: int) -> None:
        await self.pool.enqueue_job("noop", i)


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
        "client": "arq pool (redis.asyncio)",
        "redis_db": url.rsplit("/", 1)[-1],
    }
    async with Client(url) as c:
        await c.reset()
        return await common.run_workload(
            workload,
            args,
            rdir,
            params,
            enqueue_one=c.enqueue_one,
            enqueue_many=None,
            spawn=lambda: _spawn(url, rdir),
            worker_params=WORKER_CONFIG,
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

    return common.run_all(SYSTEM, args, run_one, unsupported=("enqueue_bulk",))


if __name__ == "__main__":
    sys.exit(main())
