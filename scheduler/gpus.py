"""GPU probes: what devices a scheduler can place work on, and how to point a worker at one.

This is the only module that touches NVML (``pynvml`` from nvidia-ml-py), and it imports it lazily, so
nothing else pays for it and machines without a driver never load it.

Probes, chosen by ``VRAMQ_GPUS`` and built by ``parse_probe``:

``nvml``
    The NVIDIA driver's view: one device per GPU, identified by its UUID; memory (v2 where the driver
    has it), utilisation, temperature and per-process memory. Workers see only their GPU
    (``CUDA_VISIBLE_DEVICES=<uuid>``) and use ``cuda:0``.
``fake:<n>x<size>``
    ``n`` simulated GPUs of ``size`` each (``fake:2x24GiB``), for tests and demos. The work runs on CPU;
    free memory is unknown, so the scheduler's own VRAM ledger is the only accounting.
``cpu`` / ``cpu:<slots>``
    No GPU: ``slots`` pseudo devices that split the machine's RAM evenly; the work runs on CPU.
``auto``
    ``nvml`` when a driver answers and reports at least one GPU, else ``cpu``.

Sizes are in MiB throughout (``*_mb`` means 2**20 bytes, as NVML and torch count them). ``fake`` sizes
accept ``B``, ``KB``/``KiB``, ``MB``/``MiB``, ``GB``/``GiB``, ``TB``/``TiB`` (decimal and binary units are
both honoured; ``K``/``M``/``G``/``T`` alone mean binary); a bare number is MiB.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import psutil

from core.types import ConfigError

log = logging.getLogger(__name__)

GpuKind = Literal["nvml", "fake", "cpu"]

MIB = 1024 * 1024
AUTO_CPU_SLOTS_MAX = 8  # more slots would cut RAM into slices too small for most models


@dataclass(frozen=True, slots=True)
class GpuInfo:
    id: str  # NVML uuid ("GPU-…"), or "fake0", "cpu0", …
    index: int
    name: str
    total_mb: int
    free_mb: int | None  # None: unknown (fake/cpu devices, or the last NVML reading failed)
    used_mb: int | None
    utilization_pct: float | None
    temperature_c: float | None
    kind: GpuKind

    def public(self) -> dict[str, Any]:
        """A JSON-friendly dict (for the scheduler's status snapshot)."""
        return {
            "id": self.id,
            "index": self.index,
            "name": self.name,
            "total_mb": self.total_mb,
            "free_mb": self.free_mb,
            "used_mb": self.used_mb,
            "utilization_pct": self.utilization_pct,
            "temperature_c": self.temperature_c,
            "kind": self.kind,
        }


@runtime_checkable
class GpuProbe(Protocol):
    """What the scheduler asks about its devices. Every method is cheap and never raises for NVML errors."""

    @property
    def kind(self) -> GpuKind: ...

    def devices(self) -> list[GpuInfo]:
        """Current reading of every device, in index order."""
        ...

    def process_memory_mb(self, pid: int) -> int | None:
        """Device memory a process uses, summed over devices; None where it cannot be known."""
        ...

    def worker_env(self, gpu_id: str) -> dict[str, str]:
        """Environment variables a worker process for ``gpu_id`` must start with."""
        ...

    def device_for_worker(self, gpu_id: str) -> str:
        """The torch device string a worker on ``gpu_id`` uses (``cuda:0`` or ``cpu``)."""
        ...

    def close(self) -> None: ...


_CPU_ENV = {"CUDA_VISIBLE_DEVICES": ""}


class _StaticProbe:
    """Devices whose description never changes: fake GPUs and CPU slots."""

    def __init__(self, kind: Literal["fake", "cpu"], count: int, total_mb: int, name: str) -> None:
        self._kind: Literal["fake", "cpu"] = kind
        self._devices = [
            GpuInfo(
                id=f"{kind}{i}",
                index=i,
                name=name,
                total_mb=total_mb,
                free_mb=None,
                used_mb=None,
                utilization_pct=None,
                temperature_c=None,
                kind=kind,
            )
            for i in range(count)
        ]
        self._ids = {d.id for d in self._devices}

    @property
    def kind(self) -> GpuKind:
        return self._kind

    def devices(self) -> list[GpuInfo]:
        return list(self._devices)

    def process_memory_mb(self, pid: int) -> int | None:
        return None

    def _check(self, gpu_id: str) -> None:
        if gpu_id not in self._ids:
            raise KeyError(f"unknown {self._kind} device {gpu_id!r}; known: {sorted(self._ids)}")

    def worker_env(self, gpu_id: str) -> dict[str, str]:
        self._check(gpu_id)
        return dict(_CPU_ENV)

    def device_for_worker(self, gpu_id: str) -> str:
        self._check(gpu_id)
        return "cpu"

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        d = self._devices[0]
        return f"<{type(self).__name__} {len(self._devices)}x{d.total_mb}MiB>"


class FakeProbe(_StaticProbe):
    """``n`` simulated GPUs of ``total_mb`` each; jobs run on CPU."""

    def __init__(self, count: int, total_mb: int) -> None:
        super().__init__("fake", count, total_mb, f"Fake GPU ({total_mb} MiB)")


class CpuProbe(_StaticProbe):
    """``slots`` pseudo devices, each with an even share of RAM (or ``total_mb`` each)."""

    def __init__(self, slots: int, total_mb: int | None = None) -> None:
        if total_mb is None:
            total_mb = max(1, int(psutil.virtual_memory().total // MIB // slots))
        super().__init__("cpu", slots, total_mb, f"CPU slot ({total_mb} MiB)")


class NvmlProbe:
    """NVIDIA GPUs through NVML. ``nvml`` is the pynvml module (a stand-in in tests)."""

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        self._lock = threading.Lock()  # NVML is thread-safe, but the cache below is not
        nvml.nvmlInit()
        self._closed = False
        try:
            count = int(nvml.nvmlDeviceGetCount())
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in self._handles]
            self._names = [_text(nvml.nvmlDeviceGetName(h)) for h in self._handles]
        except Exception:
            nvml.nvmlShutdown()
            raise
        self._last: list[GpuInfo] = [
            GpuInfo(u, i, n, 0, None, None, None, None, "nvml")
            for i, (u, n) in enumerate(zip(self._uuids, self._names, strict=True))
        ]
        self.devices()  # a first reading, so _last holds real totals

    @property
    def kind(self) -> GpuKind:
        return "nvml"

    @property
    def count(self) -> int:
        return len(self._handles)

    def _memory(self, handle: Any) -> tuple[int, int, int]:
        nvml = self._nvml
        try:
            version = getattr(nvml, "nvmlMemory_v2", None)
            info = nvml.nvmlDeviceGetMemoryInfo(handle, version=version) if version else None
        except Exception:  # drivers without v2 memory info
            info = None
        if info is None:
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total) // MIB, int(info.free) // MIB, int(info.used) // MIB

    def _read(self, i: int, handle: Any) -> GpuInfo:
        nvml = self._nvml
        total, free, used = self._memory(handle)
        util: float | None
        temp: float | None
        try:
            util = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            util = None
        try:
            temp = float(nvml.nvmlDeviceGetTemperature(handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)))
        except Exception:
            temp = None
        return GpuInfo(self._uuids[i], i, self._names[i], total, free, used, util, temp, "nvml")

    def devices(self) -> list[GpuInfo]:
        with self._lock:
            if self._closed:
                return [replace(d, free_mb=None) for d in self._last]
            out: list[GpuInfo] = []
            for i, handle in enumerate(self._handles):
                try:
                    out.append(self._read(i, handle))
                except Exception as exc:
                    log.warning("NVML reading of GPU %d (%s) failed: %s", i, self._uuids[i], exc)
                    out.append(replace(self._last[i], free_mb=None))
            self._last = out
            return list(out)

    def process_memory_mb(self, pid: int) -> int | None:
        nvml = self._nvml
        total = 0
        found = False
        with self._lock:
            if self._closed:
                return None
            for handle in self._handles:
                seen: set[int] = set()
                for getter in (
                    "nvmlDeviceGetComputeRunningProcesses",
                    "nvmlDeviceGetGraphicsRunningProcesses",
                ):
                    fn = getattr(nvml, getter, None)
                    if fn is None:
                        continue
                    try:
                        procs = fn(handle)
                    except Exception as exc:
                        log.debug("NVML %s failed: %s", getter, exc)
                        continue
                    for p in procs:
                        if int(p.pid) != pid or int(p.pid) in seen:
                            continue
                        used = getattr(p, "usedGpuMemory", None)
                        if used is None:  # NVML_VALUE_NOT_AVAILABLE is mapped to None by pynvml
                            continue
                        seen.add(int(p.pid))
                        total += int(used) // MIB
                        found = True
        # Not listed usually means another PID namespace (containers), not zero use.
        return total if found else None

    def _check(self, gpu_id: str) -> None:
        if gpu_id not in self._uuids:
            raise KeyError(f"unknown GPU {gpu_id!r}; known: {self._uuids}")

    def worker_env(self, gpu_id: str) -> dict[str, str]:
        self._check(gpu_id)
        return {"CUDA_VISIBLE_DEVICES": gpu_id, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    def device_for_worker(self, gpu_id: str) -> str:
        self._check(gpu_id)
        return "cuda:0"

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown failed: %s", exc)

    def __repr__(self) -> str:
        return f"<NvmlProbe {len(self._handles)} GPU(s)>"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_UNITS = {
    "": MIB,  # a bare number is MiB
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": MIB,
    "mb": 1000**2,
    "mib": MIB,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size_mb(text: str) -> int:
    """``24GiB`` -> 24576; ``80GB`` -> 76293; ``512MiB`` -> 512; a bare number is MiB."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"invalid size {text!r}: expected a number and a unit such as 24GiB, 80GB or 512MiB"
        )
    mb = int(float(m.group(1)) * _UNITS[m.group(2).lower()] // MIB)
    if mb <= 0:
        raise ConfigError(f"invalid size {text!r}: must be at least 1 MiB")
    return mb


def _auto_cpu_slots() -> int:
    return max(1, min(os.cpu_count() or 1, AUTO_CPU_SLOTS_MAX))


def _try_nvml() -> NvmlProbe | None:
    try:
        probe = NvmlProbe()
    except Exception as exc:  # no driver, no library, no permission: all mean "no NVIDIA GPU here"
        log.info("NVML not available (%s); using CPU slots", exc)
        return None
    if probe.count == 0:
        probe.close()
        return None
    return probe


_SPEC_HELP = "expected auto, nvml, cpu, cpu:<slots> or fake:<n>x<size> (e.g. fake:2x24GiB)"


def parse_probe(spec: str) -> GpuProbe:
    """Build the probe described by ``VRAMQ_GPUS``; a malformed spec raises ConfigError."""
    s = spec.strip().lower()
    if s == "auto":
        nvml = _try_nvml()
        return nvml if nvml is not None else CpuProbe(_auto_cpu_slots())
    if s == "nvml":
        try:
            probe = NvmlProbe()
        except Exception as exc:
            raise ConfigError(f"VRAMQ_GPUS=nvml but NVML is not available: {exc}") from None
        if probe.count == 0:
            probe.close()
            raise ConfigError("VRAMQ_GPUS=nvml but NVML reports no GPU")
        return probe
    if s == "cpu":
        return CpuProbe(_auto_cpu_slots())
    if s.startswith("cpu:"):
        raw = s[4:]
        if not raw.isdigit() or not 1 <= int(raw) <= 1024:
            raise ConfigError(f"invalid GPU spec {spec!r}: cpu:<slots> needs 1..1024 slots")
        return CpuProbe(int(raw))
    if s.startswith("fake:"):
        count_raw, sep, size_raw = spec.strip()[5:].partition("x")
        if not sep or not count_raw.strip().isdigit() or not 1 <= int(count_raw) <= 1024:
            raise ConfigError(f"invalid GPU spec {spec!r}: fake needs <n>x<size> with n in 1..1024")
        try:
            size_mb = parse_size_mb(size_raw)
        except ConfigError as exc:
            raise ConfigError(f"invalid GPU spec {spec!r}: {exc}") from None
        return FakeProbe(int(count_raw), size_mb)
    raise ConfigError(f"invalid GPU spec {spec!r}: {_SPEC_HELP}")
