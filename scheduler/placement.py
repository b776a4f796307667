"""Placement: which jobs to claim, which workers to start and which to stop.

This module is pure: plain functions over frozen dataclasses, standard library only, no clock of its
own (``now`` is a parameter) and no randomness. The leader calls :func:`plan` once per loop
iteration with a snapshot of its GPUs, its workers and the head of the queue per model, and applies
the :class:`Plan` it gets back.

The VRAM ledger
---------------
Every worker holds its ``vram_mb`` on its GPU in every state: a load in flight counts from the
moment it is dispatched (its declared figure), a ready worker counts with what it measured, and a
stopping worker counts until its process is gone. The free memory of a GPU is::

    free = min(NVML free, total - ledger) - reserve

NVML's free figure already excludes the memory our own workers really use, so the ledger is *not*
subtracted from it a second time; the minimum keeps the tighter of two views. The ledger knows about
loads that have not allocated yet; NVML knows about memory held by processes the ledger does not
know. Fake and CPU probes report no NVML figure, and then the ledger alone decides. ``free`` may be
negative when measured figures over-commit a GPU; nothing new is placed there until it drains.

The rules
---------
1. Warm reuse first. Each model gets ``min(queued, idle workers of the model)`` claims. A worker that
   gets a claim counts as busy for the rest of the round and is never evicted.
2. Starts, by demand order (priority desc, oldest wait desc, model id). A model is started while it
   still has queued work that no claim and no load in flight will serve, and it runs fewer than
   ``max_workers`` workers (stopping ones not counted). The worker goes to the best fit: the GPU with
   the least free memory that still fits it, with no load in flight (one load per GPU at a time).
   When none fits, idle workers of other models are evicted in LRU order from the one GPU that needs
   the fewest evictions (then the least evicted memory, then the lowest id). Busy, loading and
   stopping workers are never evicted. A model that cannot fit any GPU even when it is empty is never
   started; :attr:`Plan.unplaceable` names it so that the caller can fail its jobs. A demand that
   cannot be placed does not block the ones after it: a small job runs while a big one waits.
3. Anti-starvation. When the top demand has waited longer than ``starvation_s``, got neither a claim
   nor a start, and could not be placed, one GPU is reserved for it: the one where it would fit once
   our non-busy workers are gone, with the least busy memory. While the reservation stands no other
   model is started on that GPU, idle workers of other models there are not reused but evicted, and
   as soon as the reserved model fits there it is started there. An existing reservation is kept
   while its model is still starved (even if another demand became the top one, so that it cannot
   flap), and ends when the model has no demand or gets a claim or a start.

Every start the plan places keeps its GPU's ledger (after the plan's evictions) within
``total_mb - reserve_mb``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Demand",
    "Gpu",
    "Plan",
    "Reservation",
    "Worker",
    "WorkerStateName",
    "best_fit",
    "demand_order",
    "eviction_candidates",
    "fits_anywhere",
    "free_mb",
    "idle_expired",
    "loading_on",
    "plan",
    "used_mb",
]

WorkerStateName = Literal["loading", "idle", "busy", "stopping"]


@dataclass(frozen=True)
class Gpu:
    """A device as the probe sees it."""

    id: str  # GPU uuid or "fake0"/"cpu0"
    total_mb: int
    free_mb: int | None = None  # NVML free right now; None for fake and CPU probes


@dataclass(frozen=True)
class Worker:
    """A worker subprocess: one model, one GPU."""

    id: str
    model: str
    gpu_id: str
    state: WorkerStateName
    vram_mb: int  # declared vram_mb while loading; the measured figure once ready
    last_used: float  # monotonic seconds when it last finished a job (or became ready)


@dataclass(frozen=True)
class Demand:
    """The head of the queue for one model, as the leader peeked it."""

    model: str
    vram_mb: int  # current estimate (declared, or corrected after an OOM or a measurement)
    max_workers: int
    queued: int  # runnable queued jobs seen (capped by the peek); >= 1 means there is work
    priority: int  # highest priority among them
    oldest_wait_s: float  # how long the oldest of the highest-priority jobs has waited


@dataclass(frozen=True)
class Reservation:
    """Anti-starvation: a GPU held for one model."""

    gpu_id: str
    model: str


@dataclass(frozen=True)
class Plan:
    """What the leader does this round."""

    claims: Mapping[str, int]  # model -> jobs to claim now (only models with at least one)
    starts: Sequence[tuple[str, str]]  # (model, gpu_id) workers to spawn now
    evictions: Sequence[str]  # worker ids to stop now (room for `starts`, or the reservation)
    reservation: Reservation | None  # pass it back to the next round's plan()
    claimed: Sequence[str] = ()  # ids of the idle workers chosen for the claims, per model in turn
    unplaceable: Sequence[str] = ()  # models with demand that fit no GPU even when it is empty


# -- the ledger ---------------------------------------------------------------------------------


def used_mb(gpu_id: str, workers: Iterable[Worker]) -> int:
    """VRAM the ledger counts on a GPU: every worker there, in any state."""
    return sum(w.vram_mb for w in workers if w.gpu_id == gpu_id)


def free_mb(gpu: Gpu, workers: Iterable[Worker], reserve_mb: int) -> int:
    """``min(NVML free, total - ledger) - reserve``; the ledger alone when NVML is unknown.

    NVML free already excludes memory held by our own workers, so the ledger is not subtracted from
    it again. The result may be negative when measured figures over-commit the GPU.
    """
    room = gpu.total_mb - used_mb(gpu.id, workers)
    if gpu.free_mb is not None:
        room = min(room, gpu.free_mb)
    return room - reserve_mb


def loading_on(gpu_id: str, workers: Iterable[Worker]) -> bool:
    """Whether a load is in flight on the GPU (one load per GPU at a time)."""
    return any(w.gpu_id == gpu_id and w.state == "loading" for w in workers)


def fits_anywhere(gpus: Iterable[Gpu], vram_mb: int, reserve_mb: int) -> bool:
    """Whether the model fits at least one GPU when that GPU is empty (by its total)."""
    return any(vram_mb + reserve_mb <= g.total_mb for g in gpus)


def best_fit(
    gpus: Iterable[Gpu],
    workers: Collection[Worker],
    need_mb: int,
    reserve_mb: int,
    exclude: Collection[str] = (),
) -> Gpu | None:
    """The GPU with the least free memory that still fits ``need_mb`` and has no load in flight.

    Ties go to the lowest id; GPUs whose id is in ``exclude`` are skipped.
    """
    best: Gpu | None = None
    best_key: tuple[int, str] | None = None
    for gpu in gpus:
        if gpu.id in exclude or loading_on(gpu.id, workers):
            continue
        room = free_mb(gpu, workers, reserve_mb)
        if room < need_mb:
            continue
        key = (room, gpu.id)
        if best_key is None or key < best_key:
            best, best_key = gpu, key
    return best


def eviction_candidates(gpu_id: str, workers: Iterable[Worker], keep_model: str) -> list[Worker]:
    """Idle workers of other models on the GPU, least recently used first (then by id)."""
    found = [w for w in workers if w.gpu_id == gpu_id and w.state == "idle" and w.model != keep_model]
    found.sort(key=lambda w: (w.last_used, w.id))
    return found


def idle_expired(workers: Iterable[Worker], idle_evict_s: Mapping[str, float], now: float) -> list[str]:
    """Ids of idle workers idle for longer than their model's ``idle_evict_s``, oldest first.

    Models missing from ``idle_evict_s`` never expire.
    """
    found = [
        w
        for w in workers
        if w.state == "idle" and w.model in idle_evict_s and now - w.last_used > idle_evict_s[w.model]
    ]
    found.sort(key=lambda w: (w.last_used, w.id))
    return [w.id for w in found]


def demand_order(demands: Iterable[Demand]) -> list[Demand]:
    """Demands in the order the plan serves them: priority desc, oldest wait desc, model id."""
    return sorted(demands, key=lambda d: (-d.priority, -d.oldest_wait_s, d.model))


# -- the plan -----------------------------------------------------------------------------------


def _free_without(gpu: Gpu, workers: Iterable[Worker], removed: Sequence[Worker], reserve_mb: int) -> int:
    """Free memory on the GPU once ``removed`` are gone; NVML free grows by exactly their vram."""
    gone = {w.id for w in removed}
    gone_mb = sum(w.vram_mb for w in removed)
    rest = [w for w in workers if w.id not in gone]
    if gpu.free_mb is not None:
        gpu = dataclasses.replace(gpu, free_mb=gpu.free_mb + gone_mb)
    return free_mb(gpu, rest, reserve_mb)


@dataclass
class _Round:
    """The working state of one planning round: the plan's decisions applied as they are made."""

    gpus: dict[str, Gpu]
    workers: dict[str, Worker]
    reserve_mb: int
    now: float
    evictions: list[str] = field(default_factory=list)
    starts: list[tuple[str, str]] = field(default_factory=list)
    spawned: int = 0

    def on(self, gpu_id: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.gpu_id == gpu_id]

    def count(self, model: str) -> int:
        return sum(1 for w in self.workers.values() if w.model == model and w.state != "stopping")

    def loading(self, model: str) -> int:
        return sum(1 for w in self.workers.values() if w.model == model and w.state == "loading")

    def evict(self, victims: Iterable[Worker]) -> None:
        for w in victims:
            del self.workers[w.id]
            self.evictions.append(w.id)
            gpu = self.gpus.get(w.gpu_id)
            if gpu is not None and gpu.free_mb is not None:
                self.gpus[gpu.id] = dataclasses.replace(gpu, free_mb=gpu.free_mb + w.vram_mb)

    def start(self, demand: Demand, gpu_id: str) -> None:
        self.spawned += 1
        new_id = f"<start {self.spawned}: {demand.model}>"
        self.workers[new_id] = Worker(new_id, demand.model, gpu_id, "loading", demand.vram_mb, self.now)
        self.starts.append((demand.model, gpu_id))
        gpu = self.gpus[gpu_id]
        if gpu.free_mb is not None:  # NVML will see it once it allocates; count it now
            self.gpus[gpu_id] = dataclasses.replace(gpu, free_mb=gpu.free_mb - demand.vram_mb)

    def make_room(self, model: str, need_mb: int, gpu_ids: Iterable[str]) -> tuple[str, list[Worker]] | None:
        """The GPU needing the fewest LRU evictions (then least evicted memory, then id) to fit."""
        best: tuple[tuple[int, int, str], list[Worker]] | None = None
        for gpu_id in gpu_ids:
            gpu = self.gpus[gpu_id]
            here = self.on(gpu_id)
            if loading_on(gpu_id, here):
                continue
            victims = eviction_candidates(gpu_id, here, keep_model=model)
            for k in range(len(victims) + 1):
                if _free_without(gpu, here, victims[:k], self.reserve_mb) >= need_mb:
                    key = (k, sum(w.vram_mb for w in victims[:k]), gpu_id)
                    if best is None or key < best[0]:
                        best = (key, victims[:k])
                    break
        if best is None:
            return None
        return best[0][2], best[1]

    def place(self, demand: Demand, reservation: Reservation | None) -> tuple[str, list[Worker]] | None:
        """Where to start one worker for the demand, and whom to evict for it (or None)."""
        if reservation is not None and reservation.model == demand.model:
            there = self.make_room(demand.model, demand.vram_mb, [reservation.gpu_id])
            if there is not None:
                return there
        held: set[str] = set()
        if reservation is not None and reservation.model != demand.model:
            held.add(reservation.gpu_id)
        gpu = best_fit(self.gpus.values(), list(self.workers.values()), demand.vram_mb, self.reserve_mb, held)
        if gpu is not None:
            return gpu.id, []
        return self.make_room(demand.model, demand.vram_mb, [g for g in self.gpus if g not in held])

    def reserve_for(self, demand: Demand) -> Reservation | None:
        """The GPU to hold for a starved demand, or None when no GPU could ever take it."""
        best: tuple[tuple[int, int, str], Reservation] | None = None
        for gpu_id, gpu in self.gpus.items():
            if demand.vram_mb + self.reserve_mb > gpu.total_mb:
                continue
            here = self.on(gpu_id)
            # Workers of other models leave (evicted once idle), and so do stopping ones of its own.
            going = [w for w in here if w.model != demand.model or w.state == "stopping"]
            if _free_without(gpu, here, going, self.reserve_mb) < demand.vram_mb:
                continue  # memory held outside vramq keeps it out even once ours are gone
            busy_mb = sum(w.vram_mb for w in going if w.state == "busy")
            not_busy = [w for w in going if w.state != "busy"]
            enough_now = _free_without(gpu, here, not_busy, self.reserve_mb) >= demand.vram_mb
            key = (0 if enough_now else 1, busy_mb, gpu_id)
            if best is None or key < best[0]:
                best = (key, Reservation(gpu_id=gpu_id, model=demand.model))
        return None if best is None else best[1]


def _valid_reservation(
    reservation: Reservation | None, gpus: Mapping[str, Gpu], demands: Mapping[str, Demand], reserve_mb: int
) -> Reservation | None:
    if reservation is None:
        return None
    gpu = gpus.get(reservation.gpu_id)
    demand = demands.get(reservation.model)
    if gpu is None or demand is None or demand.vram_mb + reserve_mb > gpu.total_mb:
        return None
    return reservation


def plan(
    gpus: Sequence[Gpu],
    workers: Sequence[Worker],
    demands: Sequence[Demand],
    *,
    reserve_mb: int,
    now: float,
    starvation_s: float,
    reservation: Reservation | None = None,
) -> Plan:
    """Decide this round's claims, starts, evictions and reservation (see the module docstring).

    ``demands`` holds at most one entry per model; entries with ``queued < 1`` are ignored.
    ``reservation`` is the one the previous round returned.
    """
    live = [d for d in demands if d.queued >= 1]
    by_model = {d.model: d for d in live}
    if len(by_model) != len(live):
        raise ValueError("plan() takes at most one demand per model")
    state = _Round(
        gpus={g.id: g for g in sorted(gpus, key=lambda g: g.id)},
        workers={w.id: w for w in workers},
        reserve_mb=reserve_mb,
        now=now,
    )
    held = _valid_reservation(reservation, state.gpus, by_model, reserve_mb)
    order = demand_order(live)

    # 1. Warm reuse. The reserved model goes first: if it gets a claim the reservation ends, and
    #    other models may reuse their idle workers on that GPU again.
    claims: dict[str, int] = {}
    claimed: list[str] = []
    first = [by_model[held.model]] if held is not None else []
    for demand in first + [d for d in order if held is None or d.model != held.model]:
        idle = [
            w
            for w in state.workers.values()
            if w.model == demand.model
            and w.state == "idle"
            and (held is None or w.gpu_id != held.gpu_id or w.model == held.model)
        ]
        idle.sort(key=lambda w: (-w.last_used, w.id))  # warmest first; the LRU ones stay evictable
        chosen = idle[: demand.queued]
        for w in chosen:
            state.workers[w.id] = dataclasses.replace(w, state="busy")
            claimed.append(w.id)
        if chosen:
            claims[demand.model] = len(chosen)
            if held is not None and demand.model == held.model:
                held = None

    # 2. Starts.
    started: set[str] = set()
    blocked: set[str] = set()
    unplaceable: list[str] = []
    for demand in order:
        if not fits_anywhere(state.gpus.values(), demand.vram_mb, reserve_mb):
            unplaceable.append(demand.model)
            continue
        remaining = demand.queued - claims.get(demand.model, 0) - state.loading(demand.model)
        while remaining > 0 and state.count(demand.model) < demand.max_workers:
            target = state.place(demand, held)
            if target is None:
                blocked.add(demand.model)
                break
            gpu_id, victims = target
            state.evict(victims)
            state.start(demand, gpu_id)
            started.add(demand.model)
            remaining -= 1
            if held is not None and held.model == demand.model:
                held = None

    # 3. Anti-starvation.
    starved = blocked - started - set(claims)
    keep: Reservation | None = None
    if held is not None and held.model in starved:
        keep = held
    else:
        placeable = [d for d in order if d.model not in unplaceable]
        if placeable and placeable[0].model in starved and placeable[0].oldest_wait_s > starvation_s:
            keep = state.reserve_for(placeable[0])
    if keep is not None:
        state.evict(eviction_candidates(keep.gpu_id, state.on(keep.gpu_id), keep_model=keep.model))

    return Plan(
        claims=claims,
        starts=tuple(state.starts),
        evictions=tuple(state.evictions),
        reservation=keep,
        claimed=tuple(claimed),
        unplaceable=tuple(unplaceable),
    )
