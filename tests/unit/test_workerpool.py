"""WorkerHandle with real spawned worker processes (demo.sleep, and one mesh.smooth run)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest

from core.registry import Registry
from core.types import ErrorKind
from scheduler.gpus import FakeProbe
from scheduler.workerpool import (
    CancelledAck,
    Crashed,
    Done,
    Failed,
    Progress,
    Unfinished,
    WorkerHandle,
    WorkerStartError,
    WorkerStateError,
    stop_all,
)

REGISTRY = Registry.load()
DATA = Path(__file__).resolve().parent.parent / "data"
LONG_JOB = {"seconds": 600}

Spawn = Callable[..., WorkerHandle]


async def wait_until(condition: Callable[[], bool], within_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.005)


def state_of(h: WorkerHandle) -> str:
    return h.state  # read through a call, so a type checker does not keep an earlier narrowing


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def probe() -> FakeProbe:
    return FakeProbe(2, 24576)


@pytest.fixture
async def spawn(probe: FakeProbe) -> AsyncIterator[Spawn]:
    handles: list[WorkerHandle] = []

    def make(model: str = "demo.sleep", gpu: str = "fake0", **env: str) -> WorkerHandle:
        spec = REGISTRY.get(model)
        assert spec is not None
        handle = WorkerHandle(spec, gpu, probe, extra_env=env)
        handle.start()
        handles.append(handle)
        return handle

    yield make
    for h in handles:
        h.kill()
    for h in handles:
        if h.pid is not None:
            await h.wait_exit(timeout_s=10)


async def started(spawn: Spawn, **env: str) -> WorkerHandle:
    h = spawn(**env)
    await h.wait_ready(timeout_s=60)
    return h


async def test_ready_handshake_and_a_job(spawn: Spawn, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    h = spawn()
    assert state_of(h) == "loading" and h.alive and h.pid is not None
    ready = await h.wait_ready(timeout_s=60)
    spawn_s = time.perf_counter() - t0
    assert ready.pid == h.pid and ready.device == "cpu" and ready.vram_mb is None
    assert h.state == "idle" and h.ready is ready
    assert await h.wait_ready(timeout_s=1) is ready

    result = await h.run("job-a", 1, {"seconds": 0}, tmp_path / "a")
    assert isinstance(result, Done)
    assert result.job_id == "job-a" and result.result["pid"] == h.pid and result.outputs == []
    assert h.state == "idle" and h.jobs_run == 1 and h.job_id is None

    n = 50
    t0 = time.perf_counter()
    for i in range(n):
        assert isinstance(await h.run(f"j{i}", 1, {"seconds": 0}, tmp_path / "b"), Done)
    round_trip_ms = (time.perf_counter() - t0) / n * 1000
    print(f"spawn+load {spawn_s:.3f}s, 0-second job round trip {round_trip_ms:.2f} ms")
    assert round_trip_ms < 100


async def test_progress_reaches_the_callback(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn)
    seen: list[Progress] = []
    result = await h.run("p", 1, {"seconds": 0.3, "steps": 3}, tmp_path, on_progress=seen.append)
    assert isinstance(result, Done)
    fractions = [p.fraction for p in seen]
    # Steps 1 and 2 of 3 are reported; the final 100% is implied by the outcome and not sent.
    assert fractions == sorted(fractions) and len(fractions) == 2 and fractions[-1] < 1.0
    assert all(p.job_id == "p" for p in seen)


async def test_a_broken_progress_callback_does_not_break_the_job(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn)

    def boom(p: Progress) -> None:
        raise ValueError("callback bug")

    assert isinstance(await h.run("p", 1, {"seconds": 0}, tmp_path, on_progress=boom), Done)


async def test_failures_are_classified_and_the_worker_stays(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn)
    failed = await h.run("f", 1, {"seconds": 0, "fail": True}, tmp_path)
    assert isinstance(failed, Failed)
    assert failed.kind == "model_error"
    assert failed.message.startswith("RuntimeError: ") and "\n" not in failed.message
    bad = await h.run("b", 1, {"seconds": "soon"}, tmp_path)
    assert isinstance(bad, Failed) and bad.kind == "invalid_input"
    assert h.state == "idle"
    assert isinstance(await h.run("ok", 2, {"seconds": 0}, tmp_path), Done)


async def test_run_only_when_idle(spawn: Spawn, tmp_path: Path) -> None:
    h = spawn()
    with pytest.raises(WorkerStateError):
        await h.run("early", 1, {"seconds": 0}, tmp_path)
    await h.wait_ready(timeout_s=60)
    job = asyncio.ensure_future(h.run("long", 1, LONG_JOB, tmp_path))
    await wait_until(lambda: h.state == "busy", what="busy")
    with pytest.raises(WorkerStateError):
        await h.run("second", 1, {"seconds": 0}, tmp_path)
    assert not h.cancel("some-other-job")
    assert h.cancel("long")
    assert isinstance(await job, CancelledAck)
    with pytest.raises(WorkerStateError):
        h.start()


async def test_cooperative_cancel_keeps_the_worker_warm(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn)
    seen: list[Progress] = []
    job = asyncio.ensure_future(h.run("c", 1, {"seconds": 600, "steps": 60000}, tmp_path, seen.append))
    await wait_until(lambda: bool(seen), what="first progress")
    t0 = time.perf_counter()
    assert h.cancel("c", grace_s=30)
    result = await job
    assert isinstance(result, CancelledAck) and result.job_id == "c"
    assert time.perf_counter() - t0 < 1.0
    assert h.state == "idle" and h.alive
    assert isinstance(await h.run("after", 1, {"seconds": 0}, tmp_path), Done)


async def test_cancel_escalates_to_kill_when_ignored(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn, VRAMQ_DEMO_STUBBORN="1")
    job = asyncio.ensure_future(h.run("c", 1, LONG_JOB, tmp_path))
    await wait_until(lambda: h.state == "busy", what="busy")
    t0 = time.perf_counter()
    h.cancel("c", grace_s=0.2, kill_after_s=0.3)
    result = await job
    assert isinstance(result, Crashed)
    assert result.cause == "cancelled" and result.error_kind is ErrorKind.CANCELLED
    assert result.exitcode == -signal.SIGKILL  # SIGTERM was ignored
    assert 0.4 < time.perf_counter() - t0 < 5
    assert h.state == "gone" and not h.alive


async def test_sigkill_mid_job_resolves_as_crashed_quickly(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn, VRAMQ_DEMO_RECORD_DIR=str(tmp_path / "rec"))
    exits: list[WorkerHandle] = []
    h._on_exit = exits.append
    job = asyncio.ensure_future(h.run("k", 3, LONG_JOB, tmp_path / "out"))
    record = tmp_path / "rec" / f"executions-{h.pid}.jsonl"
    await wait_until(record.exists, what="the start record")
    assert h.pid is not None
    t0 = time.perf_counter()
    os.kill(h.pid, signal.SIGKILL)
    result = await job
    elapsed_ms = (time.perf_counter() - t0) * 1000
    print(f"SIGKILL -> Crashed in {elapsed_ms:.1f} ms")
    assert isinstance(result, Crashed)
    assert result.cause == "crashed" and result.error_kind is ErrorKind.WORKER_CRASHED
    assert result.exitcode == -signal.SIGKILL and result.job_id == "k"
    assert elapsed_ms < 250
    assert h.state == "gone" and h.exitcode == -signal.SIGKILL and exits == [h]
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["start"] and lines[0]["attempt"] == 3
    with pytest.raises(WorkerStateError):
        await h.run("again", 1, {"seconds": 0}, tmp_path)


async def test_job_timeout_kills_the_worker(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn)
    result = await h.run("t", 1, LONG_JOB, tmp_path, timeout_s=0.2)
    assert isinstance(result, Crashed)
    assert result.cause == "timeout" and result.error_kind is ErrorKind.TIMEOUT
    assert h.state == "gone"


async def test_cancelling_the_awaiting_task_kills_the_worker(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(h.run("w", 1, LONG_JOB, tmp_path), 0.2)
    assert await h.wait_exit(timeout_s=10) == -signal.SIGKILL


@pytest.mark.parametrize(
    ("how", "kind"),
    [("oom", ErrorKind.OOM), ("error", ErrorKind.MODEL_ERROR), ("crash", ErrorKind.WORKER_CRASHED)],
)
async def test_load_failures(spawn: Spawn, how: str, kind: ErrorKind) -> None:
    h = spawn(VRAMQ_DEMO_LOAD_FAIL=how)
    with pytest.raises(WorkerStartError) as err:
        await h.wait_ready(timeout_s=60)
    assert err.value.kind is kind
    if how == "oom":
        assert "out of memory" in err.value.message
    await h.wait_exit(timeout_s=10)
    assert h.state == "gone"
    assert h.exitcode == (3 if how == "crash" else 1)


async def test_adapter_that_cannot_be_imported(probe: FakeProbe) -> None:
    spec = REGISTRY.get("demo.sleep")
    assert spec is not None
    from dataclasses import replace

    h = WorkerHandle(replace(spec, adapter="workers.adapters.no_such_module:Nothing"), "fake0", probe)
    h.start()
    with pytest.raises(WorkerStartError) as err:
        await h.wait_ready(timeout_s=60)
    assert err.value.kind is ErrorKind.MODEL_ERROR and "ModuleNotFoundError" in err.value.message
    await h.wait_exit(timeout_s=10)


async def test_load_timeout_kills_the_worker(spawn: Spawn) -> None:
    h = spawn(VRAMQ_DEMO_LOAD_S="600")
    with pytest.raises(WorkerStartError) as err:
        await h.wait_ready(timeout_s=0.3)
    assert err.value.kind is ErrorKind.TIMEOUT
    assert await h.wait_exit(timeout_s=10) == -signal.SIGKILL


async def test_reported_vram(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn, VRAMQ_DEMO_VRAM_MB="1234")
    assert h.ready is not None and h.ready.vram_mb == 1234 and h.vram_mb == 1234
    result = await h.run("v", 1, {"seconds": 0}, tmp_path)
    assert isinstance(result, Done) and result.vram_mb == 1234
    assert h.measured_vram_mb() == 1234  # fake devices: the probe cannot tell, the report stands


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_worker_environment(spawn: Spawn) -> None:
    before = dict(os.environ)
    h = await started(spawn, VRAMQ_TEST_MARKER="42")
    assert dict(os.environ) == before  # applied around start() only
    raw = await asyncio.to_thread(Path(f"/proc/{h.pid}/environ").read_text)
    env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["VRAMQ_TEST_MARKER"] == "42"


async def test_stop_when_idle_is_prompt_and_idempotent(spawn: Spawn) -> None:
    h = await started(spawn)
    t0 = time.perf_counter()
    assert await h.stop(grace_s=10) == 0
    assert time.perf_counter() - t0 < 2
    assert h.state == "gone" and not h.alive
    assert await h.stop() == 0
    h.kill()  # no-op once gone


async def test_stop_lets_a_running_job_finish(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn)
    job = asyncio.ensure_future(h.run("fin", 1, {"seconds": 0.3}, tmp_path))
    await wait_until(lambda: h.state == "busy", what="busy")
    stopping = asyncio.ensure_future(h.stop(grace_s=30))
    await wait_until(lambda: h.state == "stopping", what="stopping")
    assert isinstance(await job, Done)
    assert await stopping == 0


async def test_stop_escalates_to_sigkill(spawn: Spawn, tmp_path: Path) -> None:
    h = await started(spawn, VRAMQ_DEMO_STUBBORN="1")
    job = asyncio.ensure_future(h.run("s", 1, LONG_JOB, tmp_path))
    await wait_until(lambda: h.state == "busy", what="busy")
    t0 = time.perf_counter()
    both = await asyncio.gather(h.stop(grace_s=0.2, kill_after_s=0.3), h.stop(grace_s=0.2))
    assert list(both) == [-signal.SIGKILL, -signal.SIGKILL]
    assert 0.4 < time.perf_counter() - t0 < 5
    result = await job
    assert isinstance(result, Crashed) and result.cause == "killed"


async def test_stop_while_loading_terminates(spawn: Spawn) -> None:
    h = spawn(VRAMQ_DEMO_LOAD_S="600")
    assert await h.stop(grace_s=30) == -signal.SIGTERM
    with pytest.raises(WorkerStartError):
        await h.wait_ready(timeout_s=1)


async def test_stop_before_start(probe: FakeProbe) -> None:
    spec = REGISTRY.get("demo.sleep")
    assert spec is not None
    h = WorkerHandle(spec, "fake1", probe)
    assert await h.stop() is None and h.state == "gone"


async def test_stop_all(spawn: Spawn) -> None:
    handles = [await started(spawn) for _ in range(2)]
    await stop_all(handles, grace_s=5)
    assert [h.exitcode for h in handles] == [0, 0]


async def test_mesh_smooth_through_a_worker(spawn: Spawn, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    h = spawn(model="mesh.smooth", gpu="fake1")
    ready = await h.wait_ready(timeout_s=120)
    print(f"mesh.smooth spawn+load {time.perf_counter() - t0:.2f}s (load_s {ready.load_s:.2f})")
    stored = tmp_path / "upload-1"
    stored.write_bytes((DATA / "noisy_sphere.ply").read_bytes())
    inputs = {"mesh": {"file": "f1", "path": str(stored), "name": "noisy_sphere.ply"}, "iterations": 3}
    out = tmp_path / "job"
    (out / "stale").mkdir(parents=True)
    (out / "stale" / "old.txt").write_text("from an earlier attempt")
    result = await h.run("m", 1, inputs, out)
    assert isinstance(result, Done), result
    assert result.result["vertices"] == 642 and result.result["device"] == "cpu"
    files = {f.name: f for f in result.outputs}
    assert set(files) == {"mesh.glb", "mesh.obj"}  # the stale file was cleaned away
    assert files["mesh.glb"].content_type == "model/gltf-binary"
    assert files["mesh.obj"].content_type == "model/obj"
    data = (out / "mesh.glb").read_bytes()
    assert (
        files["mesh.glb"].size == len(data) and files["mesh.glb"].sha256 == hashlib.sha256(data).hexdigest()
    )

    bad = await h.run("m2", 1, {"mesh": {"file": "f2", "path": str(stored), "name": "x.fbx"}}, out)
    assert isinstance(bad, Failed) and bad.kind == "invalid_input"


PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from core.registry import Registry
    from scheduler.gpus import FakeProbe
    from scheduler.workerpool import WorkerHandle

    async def main():
        spec = Registry.load().get("demo.sleep")
        handle = WorkerHandle(spec, "fake0", FakeProbe(1, 1024))
        handle.start()
        await handle.wait_ready(timeout_s=60)
        print(handle.pid, flush=True)
        await handle.run("orphan", 1, {"seconds": 600}, sys.argv[1])

    asyncio.run(main())
    """
)


async def test_worker_dies_with_its_parent(tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    env = {**os.environ, "VRAMQ_DEMO_RECORD_DIR": str(rec)}
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, str(tmp_path / "out"), stdout=asyncio.subprocess.PIPE, env=env
    )
    worker_pid = 0
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 60)
        worker_pid = int(line)
        await wait_until(lambda: (rec / f"executions-{worker_pid}.jsonl").exists(), what="the job to start")
        assert not pid_gone(worker_pid)
        t0 = time.perf_counter()
        parent.kill()  # SIGKILL: the parent gets no chance to clean up
        await parent.wait()
        await wait_until(lambda: pid_gone(worker_pid), within_s=5, what="the orphaned worker to exit")
        print(f"orphaned worker gone {(time.perf_counter() - t0) * 1000:.1f} ms after its parent")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if worker_pid and not pid_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_describe_exit() -> None:
    from scheduler.workerpool import describe_exit

    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"
    assert describe_exit(None) == "exited (status unknown)"


async def test_submitted_jobs_run_in_order_behind_each_other(spawn: Spawn, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    h = await started(spawn, VRAMQ_DEMO_RECORD_DIR=str(rec))
    futs = [h.submit(f"q{i}", 1, {"seconds": 0}, tmp_path / f"q{i}") for i in range(40)]
    assert h.state == "busy" and h.inflight == 40 and h.job_id == "q0"
    with pytest.raises(WorkerStateError):
        h.submit("q3", 1, {"seconds": 0}, tmp_path)  # already on the worker
    with pytest.raises(WorkerStateError):
        await h.run("x", 1, {"seconds": 0}, tmp_path)  # run() wants an idle worker
    results = await asyncio.wait_for(asyncio.gather(*futs), 30)
    assert [r.job_id for r in results] == [f"q{i}" for i in range(40)]
    assert all(isinstance(r, Done) for r in results)
    assert h.state == "idle" and h.inflight == 0 and h.job_id is None and h.jobs_run == 40
    starts = [
        json.loads(x)["job_id"]
        for x in (rec / f"executions-{h.pid}.jsonl").read_text().splitlines()
        if json.loads(x)["event"] == "start"
    ]
    assert starts == [f"q{i}" for i in range(40)]


async def test_a_crash_blames_the_running_job_and_requeues_the_rest(spawn: Spawn, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    h = await started(spawn, VRAMQ_DEMO_RECORD_DIR=str(rec))
    first = h.submit("done", 1, {"seconds": 0}, tmp_path / "a")
    running = h.submit("running", 1, LONG_JOB, tmp_path / "b")
    queued = [h.submit(f"queued{i}", 1, {"seconds": 0}, tmp_path / "c") for i in range(3)]
    assert isinstance(await asyncio.wait_for(first, 30), Done)
    record = rec / f"executions-{h.pid}.jsonl"
    await wait_until(lambda: "running" in record.read_text(), what="the long job's start record")
    assert h.pid is not None and h.job_id == "running"
    os.kill(h.pid, signal.SIGKILL)
    crashed = await asyncio.wait_for(running, 10)
    assert isinstance(crashed, Crashed) and crashed.cause == "crashed"
    for fut in queued:
        result = await fut
        assert isinstance(result, Unfinished) and not result.started
        assert "before the job started" in result.message
    assert h.state == "gone"


async def test_a_queued_job_can_be_cancelled_and_times_out_on_its_own_clock(
    spawn: Spawn, tmp_path: Path
) -> None:
    h = await started(spawn)
    ahead = h.submit("ahead", 1, {"seconds": 0.5}, tmp_path / "a")
    cancelled = h.submit("cancel-me", 1, LONG_JOB, tmp_path / "b")
    # 0.3 s of its own: it would have run out while the job ahead of it ran, were the clock shared.
    after = h.submit("after", 1, {"seconds": 0.1}, tmp_path / "c", timeout_s=0.3)
    assert h.cancel("cancel-me", grace_s=5)
    assert not h.cancel("not-here")
    assert isinstance(await asyncio.wait_for(ahead, 30), Done)
    assert isinstance(await asyncio.wait_for(cancelled, 10), CancelledAck)
    assert isinstance(await asyncio.wait_for(after, 10), Done)
    assert h.state == "idle" and h.alive
