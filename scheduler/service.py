"""Running a scheduler candidate: inside an API replica (``SchedulerService``) or alone (``run_forever``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from core.registry import Registry
from core.settings import Settings
from scheduler.gpus import GpuProbe, parse_probe
from scheduler.leader import Candidate

log = logging.getLogger("vramq.scheduler")


class SchedulerService:
    """A candidate for the pool's leadership running as a background task of this process."""

    def __init__(
        self,
        *,
        settings: Settings,
        dsn: str,
        registry: Registry,
        probe: GpuProbe | None = None,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.registry = registry
        self.probe = probe if probe is not None else parse_probe(settings.gpus)
        self.candidate = Candidate(settings=settings, dsn=dsn, registry=registry, probe=self.probe)
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self.candidate.is_leader

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.candidate.run(), name="vramq-scheduler")

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop competing; a leader drains (running jobs finish within the grace, the rest are requeued)."""
        if self._task is None:
            return
        self.candidate.request_stop()
        limit = timeout_s if timeout_s is not None else self.settings.shutdown_grace_s + 15
        try:
            await asyncio.wait_for(asyncio.shield(self._task), limit)
        except TimeoutError:
            log.error("scheduler did not stop within %.0fs; cancelling it", limit)
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        finally:
            self.probe.close()
            self._task = None


async def run_forever(settings: Settings, dsn: str | None = None) -> None:
    """Run one candidate until SIGTERM/SIGINT, then drain gracefully."""
    from db.embedded import resolve_dsn

    resolved: str = (
        dsn if dsn else await asyncio.to_thread(resolve_dsn, settings.database_url, settings.data_dir)
    )
    registry = Registry.load(settings.models_file)
    service = SchedulerService(settings=settings, dsn=resolved, registry=registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("scheduler candidate for pool %s (gpus: %s)", settings.pool, settings.gpus)
    await service.start()
    await stop.wait()
    log.info("stopping: draining for up to %.0fs", settings.shutdown_grace_s)
    await service.stop()
