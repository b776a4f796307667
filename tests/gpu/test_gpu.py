"""Checks that need a real NVIDIA GPU: NVML readings, a torch CUDA worker, measured vs declared VRAM,
``CUDA_VISIBLE_DEVICES`` pinning. Skipped where no driver answers.

Run on a GPU host: ``.venv/bin/pytest -q tests/gpu -s`` (prints the figures it measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.registry import ModelSpec
from scheduler.gpus import GpuProbe, parse_probe
from scheduler.workerpool import Done, WorkerHandle

ROOT = Path(__file__).resolve().parent.parent.parent


def _nvml_probe() -> GpuProbe:
    try:
        probe = parse_probe("nvml")
    except Exception as exc:  # any failure means "no GPU here"
        pytest.skip(f"no NVIDIA driver: {exc}")
    if not probe.devices():
        pytest.skip("NVML found no device")
    return probe


pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def test_nvml_readings_are_real() -> None:
    probe = _nvml_probe()
    for d in probe.devices():
        print(
            f"GPU {d.index} {d.name} {d.id}: total {d.total_mb} MB, free {d.free_mb} MB, "
            f"util {d.utilization_pct}%, {d.temperature_c} C"
        )
        assert d.kind == "nvml"
        assert d.id.startswith("GPU-")
        assert d.total_mb > 1000
        assert d.free_mb is not None and 0 < d.free_mb <= d.total_mb
    probe.close()


async def test_torch_cuda_worker_runs_mesh_smooth_and_reports_vram(tmp_path: Path) -> None:
    probe = _nvml_probe()
    gpu = probe.devices()[0]
    spec = ModelSpec(
        id="mesh.smooth", feature="mesh", adapter="workers.adapters.mesh:SmoothAdapter", vram_mb=1024
    )
    handle = WorkerHandle(spec, gpu.id, probe)
    handle.start()
    try:
        ready = await handle.wait_ready(120)
        assert ready.device == "cuda:0"
        mesh = ROOT / "tests" / "data" / "icosphere.obj"
        t0 = time.monotonic()
        result = await handle.run(
            "gpu-job-1",
            1,
            {
                "mesh": {"file": "f1", "path": str(mesh), "name": mesh.name, "size": mesh.stat().st_size},
                "iterations": 50,
            },
            tmp_path / "out",
        )
        took = time.monotonic() - t0
        assert isinstance(result, Done), result
        assert result.result["device"].startswith("cuda")
        assert (tmp_path / "out" / "mesh.glb").stat().st_size > 0
        measured_nvml = probe.process_memory_mb(handle.pid or 0)
        print(
            f"mesh.smooth on {gpu.name}: load {ready.load_s:.2f}s, run {took:.3f}s, declared "
            f"{spec.vram_mb} MB, reported {ready.vram_mb} MB, NVML per-process {measured_nvml} MB"
        )
        assert ready.vram_mb is not None and ready.vram_mb > 0
        assert measured_nvml is None or measured_nvml > 0
    finally:
        await handle.stop(5)
        probe.close()


def test_worker_is_pinned_to_its_gpu_by_uuid(tmp_path: Path) -> None:
    probe = _nvml_probe()
    devices = probe.devices()
    target = devices[-1]
    env = probe.worker_env(target.id)
    assert env["CUDA_VISIBLE_DEVICES"] == target.id
    code = (
        "import torch, json; p = torch.cuda.get_device_properties(0);"
        "print(json.dumps({'n': torch.cuda.device_count(), 'name': p.name, 'uuid': str(p.uuid)}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"pinned worker sees {seen}")
    assert seen["n"] == 1
    assert target.id.removeprefix("GPU-") in seen["uuid"]
    probe.close()
