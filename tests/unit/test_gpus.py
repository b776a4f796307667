"""GPU probes: spec parsing, fake and CPU devices, and the NVML probe against a stand-in driver."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from core.types import ConfigError
from scheduler import gpus
from scheduler.gpus import CpuProbe, FakeProbe, GpuProbe, NvmlProbe, parse_probe, parse_size_mb

MIB = 1024 * 1024


class StubNvml:
    """Enough of pynvml's surface for NvmlProbe, with switches to make calls fail."""

    NVML_TEMPERATURE_GPU = 0
    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus: int = 2, total_mb: int = 81559) -> None:
        self.count = gpus
        self.total = total_mb * MIB
        self.used = [1000 * MIB, 2000 * MIB][:gpus] + [0] * max(0, gpus - 2)
        self.failing: set[int] = set()
        self.no_v2 = False
        self.procs: dict[int, list[Any]] = {i: [] for i in range(gpus)}
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-0000000{h}-aaaa-bbbb-cccc-dddddddddddd".encode()

    def nvmlDeviceGetName(self, h: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h: int, version: int | None = None) -> Any:
        if h in self.failing:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        if version is not None and self.no_v2:
            raise RuntimeError("NVML_ERROR_FUNCTION_NOT_FOUND")
        return SimpleNamespace(total=self.total, used=self.used[h], free=self.total - self.used[h])

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=37 + h, memory=5)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        if h in self.failing:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return 55

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return self.procs[h]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int) -> list[Any]:
        return []


def test_fake_probe_from_spec() -> None:
    probe = parse_probe("fake:2x24GiB")
    assert isinstance(probe, GpuProbe)
    assert probe.kind == "fake"
    devs = probe.devices()
    assert [d.id for d in devs] == ["fake0", "fake1"]
    assert [d.index for d in devs] == [0, 1]
    assert all(d.total_mb == 24576 and d.kind == "fake" for d in devs)
    assert all(d.free_mb is None and d.used_mb is None and d.utilization_pct is None for d in devs)
    assert probe.worker_env("fake1") == {"CUDA_VISIBLE_DEVICES": ""}
    assert probe.device_for_worker("fake0") == "cpu"
    assert probe.process_memory_mb(os.getpid()) is None
    assert devs[0].public()["total_mb"] == 24576
    with pytest.raises(KeyError):
        probe.worker_env("fake2")
    probe.close()


@pytest.mark.parametrize(
    ("text", "mb"),
    [
        ("24GiB", 24576),
        ("24gib", 24576),
        ("80GB", 76293),
        ("512MiB", 512),
        ("1.5GiB", 1536),
        ("1024", 1024),
        ("2G", 2048),
        ("1TiB", 1024 * 1024),
        ("1000MB", 953),
    ],
)
def test_sizes(text: str, mb: int) -> None:
    assert parse_size_mb(text) == mb


@pytest.mark.parametrize("text", ["", "GiB", "24 parsecs", "-1GiB", "0.1KiB", "1e3MB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size_mb(text)


def test_fake_probe_sizes() -> None:
    assert parse_probe("fake:1x80GB").devices()[0].total_mb == 76293
    assert len(parse_probe(" FAKE:3x512MiB ").devices()) == 3


def test_cpu_slots_split_ram() -> None:
    probe = parse_probe("cpu:3")
    devs = probe.devices()
    assert [d.id for d in devs] == ["cpu0", "cpu1", "cpu2"]
    expected = psutil.virtual_memory().total // MIB // 3
    assert all(d.total_mb == expected and d.kind == "cpu" and d.free_mb is None for d in devs)
    assert probe.worker_env("cpu2") == {"CUDA_VISIBLE_DEVICES": ""}
    assert probe.device_for_worker("cpu0") == "cpu"
    assert CpuProbe(2, total_mb=100).devices()[1].total_mb == 100


def test_plain_cpu_uses_a_sane_number_of_slots() -> None:
    n = len(parse_probe("cpu").devices())
    assert 1 <= n <= gpus.AUTO_CPU_SLOTS_MAX
    assert n == min(os.cpu_count() or 1, gpus.AUTO_CPU_SLOTS_MAX)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "gpu",
        "cuda",
        "fake",
        "fake:2",
        "fake:x24GiB",
        "fake:0x24GiB",
        "fake:2x24XB",
        "fake:2x",
        "cpu:0",
        "cpu:abc",
        "cpu:-1",
        "auto:2",
    ],
)
def test_bad_specs_say_what_is_expected(spec: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_probe(spec)
    assert repr(spec) in str(err.value) or "invalid size" in str(err.value)


def test_auto_falls_back_to_cpu_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_driver(nvml: Any = None) -> NvmlProbe:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setattr(gpus, "NvmlProbe", no_driver)
    assert parse_probe("auto").kind == "cpu"
    with pytest.raises(ConfigError, match="NVML is not available"):
        parse_probe("nvml")


def test_auto_with_zero_gpus_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = StubNvml(gpus=0)
    monkeypatch.setattr(gpus, "NvmlProbe", lambda nvml=None: NvmlProbe(stub))
    assert parse_probe("auto").kind == "cpu"
    assert stub.shutdowns == 1
    with pytest.raises(ConfigError, match="no GPU"):
        parse_probe("nvml")


def test_auto_picks_nvml_when_a_driver_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = StubNvml(gpus=2)
    monkeypatch.setattr(gpus, "NvmlProbe", lambda nvml=None: NvmlProbe(stub))
    probe = parse_probe("auto")
    assert probe.kind == "nvml"
    assert len(probe.devices()) == 2
    probe.close()


def test_auto_on_this_machine_never_raises() -> None:
    probe = parse_probe("auto")
    assert probe.kind in ("nvml", "cpu")
    assert probe.devices()
    probe.close()


def test_nvml_readings() -> None:
    stub = StubNvml(gpus=2, total_mb=81559)
    probe = NvmlProbe(stub)
    devs = probe.devices()
    assert [d.id for d in devs] == [
        "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
        "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd",
    ]
    d1 = devs[1]
    assert (d1.index, d1.kind, d1.name) == (1, "nvml", "NVIDIA H100 80GB HBM3")
    assert (d1.total_mb, d1.used_mb, d1.free_mb) == (81559, 2000, 81559 - 2000)
    assert (d1.utilization_pct, d1.temperature_c) == (38.0, 55.0)
    assert probe.worker_env(d1.id) == {"CUDA_VISIBLE_DEVICES": d1.id, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert probe.device_for_worker(d1.id) == "cuda:0"
    with pytest.raises(KeyError):
        probe.device_for_worker("fake0")


def test_nvml_without_memory_v2_uses_v1() -> None:
    stub = StubNvml(gpus=1)
    stub.no_v2 = True
    assert NvmlProbe(stub).devices()[0].used_mb == 1000


def test_nvml_errors_keep_the_last_reading_with_free_unknown() -> None:
    stub = StubNvml(gpus=2)
    probe = NvmlProbe(stub)
    good = probe.devices()
    stub.failing.add(0)
    devs = probe.devices()  # must not raise
    assert devs[0].free_mb is None
    assert devs[0].total_mb == good[0].total_mb and devs[0].id == good[0].id
    assert devs[1] == good[1]
    stub.failing.clear()
    assert probe.devices()[0].free_mb == good[0].free_mb


def test_nvml_process_memory() -> None:
    stub = StubNvml(gpus=2)
    stub.procs[0] = [
        SimpleNamespace(pid=4242, usedGpuMemory=300 * MIB),
        SimpleNamespace(pid=7, usedGpuMemory=MIB),
    ]
    stub.procs[1] = [SimpleNamespace(pid=4242, usedGpuMemory=200 * MIB)]
    probe = NvmlProbe(stub)
    assert probe.process_memory_mb(4242) == 500
    assert probe.process_memory_mb(7) == 1
    assert probe.process_memory_mb(99) is None  # not listed: unknown (e.g. another PID namespace)
    stub.procs[0] = [SimpleNamespace(pid=5, usedGpuMemory=None)]
    assert probe.process_memory_mb(5) is None


def test_nvml_close_is_idempotent_and_readings_survive() -> None:
    stub = StubNvml(gpus=1)
    probe = NvmlProbe(stub)
    before = probe.devices()[0]
    probe.close()
    probe.close()
    assert stub.shutdowns == 1
    after = probe.devices()[0]
    assert after.total_mb == before.total_mb and after.free_mb is None
    assert probe.process_memory_mb(1) is None


def test_nvml_init_failure_during_enumeration_shuts_down() -> None:
    stub = StubNvml(gpus=1)

    def broken(i: int) -> int:
        raise RuntimeError("NVML_ERROR_UNKNOWN")

    stub.nvmlDeviceGetHandleByIndex = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        NvmlProbe(stub)
    assert stub.shutdowns == 1


def test_fake_and_cpu_probes_are_distinct_kinds() -> None:
    assert FakeProbe(1, 1024).kind == "fake"
    assert CpuProbe(1).kind == "cpu"
    assert "1x1024MiB" in repr(FakeProbe(1, 1024))
