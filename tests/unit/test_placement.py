"""Placement rules by example, and the ledger's invariants and liveness as properties."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.placement import (
    Demand,
    Gpu,
    Plan,
    Reservation,
    Worker,
    WorkerStateName,
    best_fit,
    eviction_candidates,
    fits_anywhere,
    free_mb,
    idle_expired,
    loading_on,
    plan,
    used_mb,
)

GIB = 1024
NEVER = 1e9  # starvation_s that never triggers a reservation


def gpu(gpu_id: str = "g0", total_gib: int = 24, free: int | None = None) -> Gpu:
    return Gpu(id=gpu_id, total_mb=total_gib * GIB, free_mb=free)


def worker(
    worker_id: str,
    model: str,
    gpu_id: str = "g0",
    state: WorkerStateName = "idle",
    vram_gib: float = 4,
    last_used: float = 0.0,
) -> Worker:
    return Worker(worker_id, model, gpu_id, state, int(vram_gib * GIB), last_used)


def demand(
    model: str,
    vram_gib: float = 4,
    *,
    queued: int = 1,
    max_workers: int = 1,
    priority: int = 0,
    wait: float = 0.0,
) -> Demand:
    return Demand(model, int(vram_gib * GIB), max_workers, queued, priority, wait)


def make_plan(
    gpus: Sequence[Gpu],
    workers: Sequence[Worker],
    demands: Sequence[Demand],
    *,
    reserve_mb: int = 0,
    starvation_s: float = NEVER,
    reservation: Reservation | None = None,
) -> Plan:
    return plan(
        gpus,
        workers,
        demands,
        reserve_mb=reserve_mb,
        now=1000.0,
        starvation_s=starvation_s,
        reservation=reservation,
    )


def apply(workers: Sequence[Worker], result: Plan, demands: Sequence[Demand], now: float) -> list[Worker]:
    """What the leader does with a plan: claimed workers run, evicted ones go, starts load."""
    vram = {d.model: d.vram_mb for d in demands}
    gone = set(result.evictions)
    claimed = set(result.claimed)
    out = [
        dataclasses.replace(w, state="busy") if w.id in claimed else w for w in workers if w.id not in gone
    ]
    for n, (model, gpu_id) in enumerate(result.starts):
        out.append(Worker(f"new-{now}-{n}", model, gpu_id, "loading", vram[model], now))
    return out


# -- the ledger -------------------------------------------------------------------------------------


def test_ledger_counts_every_state_and_min_with_nvml() -> None:
    workers = [
        worker("a", "m", state="loading", vram_gib=2),
        worker("b", "m", state="idle", vram_gib=3),
        worker("c", "m", state="busy", vram_gib=4),
        worker("d", "m", state="stopping", vram_gib=5),
        worker("e", "m", gpu_id="g1", vram_gib=7),
    ]
    assert used_mb("g0", workers) == 14 * GIB
    assert free_mb(gpu(), workers, 0) == 10 * GIB
    assert free_mb(gpu(), workers, 1 * GIB) == 9 * GIB
    # NVML sees memory used outside vramq: the tighter figure wins.
    assert free_mb(gpu(free=6 * GIB), workers, 1 * GIB) == 5 * GIB
    # A load not yet allocated is invisible to NVML; the ledger still counts it.
    assert free_mb(gpu(free=20 * GIB), workers, 0) == 10 * GIB
    # Over-commit from measured figures gives a negative figure.
    assert free_mb(gpu(total_gib=12), workers, 0) == -2 * GIB
    assert loading_on("g0", workers)
    assert not loading_on("g1", workers)


def test_best_fit_picks_the_tightest_gpu_without_a_load() -> None:
    gpus = [gpu("g0", 24), gpu("g1", 16), gpu("g2", 16), gpu("g3", 12)]
    assert best_fit(gpus, [], 12 * GIB, 0) == gpus[3]
    assert best_fit(gpus, [], 13 * GIB, 0) == gpus[1]  # ties by id
    assert best_fit(gpus, [], 13 * GIB, 0, exclude={"g1"}) == gpus[2]
    busy = [worker("x", "other", "g1", "busy", 4)]
    assert best_fit(gpus, busy, 13 * GIB, 0) == gpus[2]
    loading = [worker("x", "other", "g3", "loading", 1)]
    assert best_fit(gpus, loading, 8 * GIB, 0) == gpus[1]
    assert best_fit(gpus, [], 25 * GIB, 0) is None
    assert best_fit(gpus, [], 24 * GIB, 1) is None


def test_eviction_candidates_are_idle_others_lru_first() -> None:
    workers = [
        worker("new", "a", last_used=30),
        worker("old", "b", last_used=10),
        worker("mine", "keep", last_used=0),
        worker("busy", "a", state="busy", last_used=0),
        worker("loading", "a", state="loading", last_used=0),
        worker("stopping", "a", state="stopping", last_used=0),
        worker("elsewhere", "a", gpu_id="g1", last_used=0),
    ]
    assert [w.id for w in eviction_candidates("g0", workers, keep_model="keep")] == ["old", "new"]


def test_idle_expiry() -> None:
    workers = [
        worker("fresh", "a", last_used=950),
        worker("stale", "a", last_used=100),
        worker("exact", "b", last_used=940),
        worker("older", "b", last_used=900),
        worker("busy", "a", state="busy", last_used=0),
        worker("unlisted", "c", last_used=0),
    ]
    assert idle_expired(workers, {"a": 300.0, "b": 60.0}, now=1000.0) == ["stale", "older"]
    assert idle_expired(workers, {}, now=1000.0) == []


def test_fits_anywhere_honours_the_reserve() -> None:
    gpus = [gpu("g0", 24), gpu("g1", 16)]
    assert fits_anywhere(gpus, 24 * GIB, 0)
    assert not fits_anywhere(gpus, 24 * GIB, 1)
    assert not fits_anywhere([], 1, 0)


# -- claims and starts ------------------------------------------------------------------------------


def test_warm_reuse_before_start() -> None:
    workers = [worker("w", "a", last_used=5)]
    result = make_plan([gpu()], workers, [demand("a", queued=1, max_workers=3)])
    assert result.claims == {"a": 1}
    assert result.claimed == ("w",)
    assert result.starts == ()
    assert result.evictions == ()


def test_claims_are_capped_by_queued_and_warmest_first() -> None:
    workers = [worker("w1", "a", last_used=1), worker("w2", "a", last_used=9), worker("w3", "a", last_used=5)]
    result = make_plan([gpu()], workers, [demand("a", queued=2, max_workers=3)])
    assert result.claims == {"a": 2}
    assert list(result.claimed) == ["w2", "w3"]
    assert result.starts == ()


def test_more_work_than_warm_workers_starts_more() -> None:
    gpus = [gpu("g0"), gpu("g1")]
    workers = [worker("w", "a", "g0")]
    result = make_plan(gpus, workers, [demand("a", queued=5, max_workers=2)])
    assert result.claims == {"a": 1}
    assert list(result.starts) == [("a", "g0")]


def test_max_workers_respected() -> None:
    gpus = [gpu(f"g{i}", 80) for i in range(4)]
    result = make_plan(gpus, [], [demand("a", queued=10, max_workers=2)])
    assert len(result.starts) == 2
    busy = [worker("w", "a", "g0", "busy")]
    result = make_plan(gpus, busy, [demand("a", queued=10, max_workers=2)])
    assert len(result.starts) == 1
    stopping = [worker("w", "a", "g0", "stopping")]
    result = make_plan(gpus, stopping, [demand("a", queued=10, max_workers=1)])
    assert len(result.starts) == 1  # a stopping worker does not count against max_workers


def test_loading_workers_serve_the_queue() -> None:
    workers = [worker("w", "a", "g0", "loading")]
    result = make_plan([gpu("g0"), gpu("g1")], workers, [demand("a", queued=1, max_workers=4)])
    assert result.starts == ()


def test_one_load_per_gpu() -> None:
    result = make_plan([gpu("g0", 80)], [], [demand("a", 10, queued=5, max_workers=5)])
    assert list(result.starts) == [("a", "g0")]
    loading = [worker("x", "b", "g0", "loading")]
    assert make_plan([gpu("g0", 80)], loading, [demand("a", 10)]).starts == ()
    result = make_plan([gpu("g0", 80), gpu("g1", 80)], loading, [demand("a", 10)])
    assert list(result.starts) == [("a", "g1")]
    # Two models, one GPU: only one of them loads this round.
    result = make_plan([gpu("g0", 80)], [], [demand("a", 10), demand("b", 10)])
    assert len(result.starts) == 1


def test_best_fit_in_the_plan() -> None:
    gpus = [gpu("g0", 80), gpu("g1", 24), gpu("g2", 24)]
    workers = [worker("x", "other", "g2", "busy", 8)]
    result = make_plan(gpus, workers, [demand("a", 12)])
    assert list(result.starts) == [("a", "g2")]


def test_big_and_small_model_never_co_reside_on_24_gib() -> None:
    gpus = [gpu("g0", 24)]
    big, small = demand("big", 16, priority=1), demand("small", 12)
    result = make_plan(gpus, [], [big, small])
    assert list(result.starts) == [("big", "g0")]
    # The big worker is ready and idle, its queue is empty: it is evicted for the small job.
    idle_big = [worker("b", "big", "g0", "idle", 16)]
    result = make_plan(gpus, idle_big, [small])
    assert list(result.evictions) == ["b"]
    assert list(result.starts) == [("small", "g0")]
    # With the big model's queue not empty, its warm worker is reused instead.
    result = make_plan(gpus, idle_big, [big, small])
    assert result.claims == {"big": 1}
    assert result.evictions == ()
    assert result.starts == ()


def test_busy_workers_are_never_evicted() -> None:
    workers = [worker("b", "big", "g0", "busy", 16)]
    result = make_plan([gpu("g0", 24)], workers, [demand("small", 12)])
    assert result.starts == ()
    assert result.evictions == ()
    assert result.claims == {}


def test_loading_and_stopping_workers_are_never_evicted() -> None:
    for state in ("loading", "stopping"):
        workers = [worker("b", "big", "g0", state, 16)]
        result = make_plan([gpu("g0", 24)], workers, [demand("small", 12)])
        assert result.evictions == ()
        assert result.starts == ()


def test_evicts_lru_on_the_gpu_needing_fewest_evictions() -> None:
    gpus = [gpu("g0", 24), gpu("g1", 24)]
    workers = [
        worker("a1", "a", "g0", vram_gib=8, last_used=1),
        worker("a2", "b", "g0", vram_gib=8, last_used=2),
        worker("a3", "c", "g0", vram_gib=8, last_used=3),
        worker("b1", "d", "g1", vram_gib=12, last_used=5),
        worker("b2", "e", "g1", vram_gib=12, last_used=0),
    ]
    result = make_plan(gpus, workers, [demand("new", 12)])
    assert list(result.evictions) == ["b2"]  # one eviction on g1 beats two on g0
    assert list(result.starts) == [("new", "g1")]
    result = make_plan(gpus, workers, [demand("new", 16)])
    assert list(result.evictions) == ["a1", "a2"]  # two on g0 and two on g1: less memory evicted
    assert list(result.starts) == [("new", "g0")]


def test_claimed_workers_are_not_evicted() -> None:
    workers = [worker("b", "big", "g0", "idle", 16)]
    result = make_plan([gpu("g0", 24)], workers, [demand("big", 16), demand("small", 12, priority=9)])
    assert result.claims == {"big": 1}
    assert result.evictions == ()
    assert result.starts == ()


def test_no_head_of_line_blocking() -> None:
    workers = [worker("c", "c", "g0", "busy", 8)]
    demands = [demand("big", 20, priority=10, wait=500), demand("small", 4, priority=0)]
    result = make_plan([gpu("g0", 24)], workers, demands)
    assert list(result.starts) == [("small", "g0")]


def test_reserve_is_honoured() -> None:
    reserve = 2 * GIB
    assert make_plan([gpu("g0", 24)], [], [demand("a", 22)], reserve_mb=reserve).starts == (("a", "g0"),)
    result = make_plan([gpu("g0", 24)], [], [demand("a", 22.5)], reserve_mb=reserve)
    assert result.starts == ()
    assert result.unplaceable == ("a",)
    # An idle 4 GiB worker leaves 18 GiB after the reserve: a 20 GiB model needs it gone.
    workers = [worker("x", "x", "g0", vram_gib=4)]
    result = make_plan([gpu("g0", 24)], workers, [demand("a", 20)], reserve_mb=reserve)
    assert list(result.evictions) == ["x"]
    assert list(result.starts) == [("a", "g0")]
    result = make_plan([gpu("g0", 24)], workers, [demand("a", 18)], reserve_mb=reserve)
    assert result.evictions == ()
    # NVML says memory is used outside vramq.
    nvml = [gpu("g0", 24, free=10 * GIB)]
    assert make_plan(nvml, [], [demand("a", 9)], reserve_mb=reserve).starts == ()
    assert make_plan(nvml, [], [demand("a", 8)], reserve_mb=reserve).starts == (("a", "g0"),)


def test_eviction_with_nvml_counts_the_evicted_memory_as_freed() -> None:
    workers = [worker("x", "x", "g0", vram_gib=8)]
    nvml = [gpu("g0", 24, free=14 * GIB)]  # 2 GiB held outside vramq
    result = make_plan(nvml, workers, [demand("a", 20)], reserve_mb=1 * GIB)
    assert list(result.evictions) == ["x"]
    assert list(result.starts) == [("a", "g0")]
    result = make_plan(nvml, workers, [demand("a", 21.5)], reserve_mb=1 * GIB)
    assert result.evictions == ()
    assert result.starts == ()


def test_over_committed_gpu_gets_nothing_new() -> None:
    workers = [worker("x", "x", "g0", "busy", 25)]
    result = make_plan([gpu("g0", 24)], workers, [demand("a", 1)])
    assert result.starts == ()


def test_model_too_big_for_every_gpu_is_never_started() -> None:
    gpus = [gpu("g0", 24), gpu("g1", 16)]
    workers = [worker("x", "x", "g0", vram_gib=4)]
    result = make_plan(gpus, workers, [demand("huge", 30, wait=1e6)], starvation_s=0)
    assert result.starts == ()
    assert result.evictions == ()
    assert result.reservation is None
    assert result.unplaceable == ("huge",)


def test_demands_without_work_are_ignored_and_duplicates_rejected() -> None:
    workers = [worker("w", "a")]
    assert make_plan([gpu()], workers, [demand("a", queued=0)]).claims == {}
    with pytest.raises(ValueError):
        make_plan([gpu()], [], [demand("a"), demand("a")])


# -- anti-starvation --------------------------------------------------------------------------------


def test_starvation_reservation_lifecycle() -> None:
    gpus = [gpu("g0", 24), gpu("g1", 24)]
    workers = [
        worker("s0", "s", "g0", "busy", 8),
        worker("s1", "s", "g1", "busy", 8),
        worker("y", "y", "g0", "idle", 4),
    ]
    big = demand("big", 20, wait=100)
    small = demand("s", 8, queued=5, max_workers=2, wait=10)

    # Round 1: big fits nowhere even with evictions; it has waited too long: g0 is held for it and
    # the idle worker of another model there is evicted.
    first = make_plan(gpus, workers, [big, small], starvation_s=60)
    assert first.reservation == Reservation(gpu_id="g0", model="big")
    assert list(first.evictions) == ["y"]
    assert first.starts == ()
    assert make_plan(gpus, workers, [big, small], starvation_s=200).reservation is None

    # Round 2: the small model's workers are idle again. The one on g0 is not reused but evicted;
    # a new model that would best-fit g0 goes elsewhere; big starts on g0; the reservation ends.
    workers = [worker("s0", "s", "g0", "idle", 8, 5), worker("s1", "s", "g1", "idle", 8, 5)]
    other = demand("x", 4, priority=5)
    second = make_plan(gpus, workers, [big, small, other], starvation_s=60, reservation=first.reservation)
    assert second.claims == {"s": 1}
    assert list(second.claimed) == ["s1"]
    assert list(second.evictions) == ["s0"]
    assert sorted(second.starts) == [("big", "g0"), ("x", "g1")]
    assert second.reservation is None

    # Without the reservation, x would have taken g0 (tie on free memory, lowest id).
    plain = make_plan(gpus, workers, [big, small, other], starvation_s=NEVER)
    assert ("x", "g0") in plain.starts


def test_reservation_blocks_other_starts_while_busy_work_drains() -> None:
    gpus = [gpu("g0", 24)]
    workers = [worker("s0", "s", "g0", "busy", 8)]
    held = Reservation("g0", "big")
    demands = [demand("big", 20, wait=100), demand("tiny", 1, priority=9)]
    result = make_plan(gpus, workers, demands, starvation_s=60, reservation=held)
    assert result.starts == ()
    assert result.reservation == held


def test_reservation_is_kept_even_if_another_demand_becomes_top() -> None:
    gpus = [gpu("g0", 24), gpu("g1", 24)]
    workers = [worker("s0", "s", "g0", "busy", 8), worker("s1", "s", "g1", "busy", 8)]
    held = Reservation("g1", "big")
    demands = [demand("big", 20, wait=100), demand("other", 20, priority=5, wait=500)]
    result = make_plan(gpus, workers, demands, starvation_s=60, reservation=held)
    assert result.reservation == held


def test_reservation_ends_without_demand_or_when_claimed() -> None:
    gpus = [gpu("g0", 24)]
    held = Reservation("g0", "big")
    workers = [worker("s0", "s", "g0", "busy", 8)]
    assert make_plan(gpus, workers, [], starvation_s=0, reservation=held).reservation is None
    warm = [worker("b", "big", "g0", "idle", 20)]
    result = make_plan(gpus, warm, [demand("big", 20, wait=100)], starvation_s=0, reservation=held)
    assert result.claims == {"big": 1}
    assert result.reservation is None
    gone = Reservation("g9", "big")
    result = make_plan(gpus, workers, [demand("big", 20, wait=100)], starvation_s=1e6, reservation=gone)
    assert result.reservation is None


def test_reservation_picks_the_gpu_that_would_fit_with_least_busy_memory() -> None:
    gpus = [gpu("g0", 24), gpu("g1", 24), gpu("g2", 24)]
    workers = [
        worker("a", "s", "g0", "busy", 6),
        worker("b", "s", "g1", "busy", 2),
        worker("c", "t", "g1", "loading", 10),
        worker("d", "s", "g2", "busy", 4),
        worker("e", "t", "g2", "stopping", 16),
    ]
    # Busy memory: g0 6, g1 2, g2 4. With non-busy gone, 20 GiB fits g1 and g2 (not g0).
    result = make_plan(gpus, workers, [demand("big", 20, wait=100)], starvation_s=0)
    assert result.reservation == Reservation("g1", "big")
    assert result.evictions == ()  # the loading worker finishes first, then goes


def test_no_reservation_when_the_top_demand_is_being_served() -> None:
    gpus = [gpu("g0", 24)]
    workers = [worker("b", "big", "g0", "busy", 20)]
    result = make_plan(gpus, workers, [demand("big", 20, wait=100, queued=3)], starvation_s=0)
    assert result.reservation is None  # its own worker is busy: max_workers, not others, holds it


# -- properties ---------------------------------------------------------------------------------------

STATES: tuple[WorkerStateName, ...] = ("loading", "idle", "busy", "stopping")


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Gpu], list[Worker], list[Demand], int, Reservation | None]:
    reserve = draw(st.sampled_from([0, 512, 2048]))
    totals = draw(st.lists(st.sampled_from([8, 16, 24, 40, 80]), min_size=1, max_size=3))
    models = [f"m{i}" for i in range(draw(st.integers(1, 5)))]
    vram = {m: draw(st.integers(256, 30 * GIB)) for m in models}
    gpu_ids = [f"g{i}" for i in range(len(totals))]
    workers = []
    for j in range(draw(st.integers(0, 10))):
        model = draw(st.sampled_from(models))
        workers.append(
            Worker(
                f"w{j}",
                model,
                draw(st.sampled_from(gpu_ids)),
                draw(st.sampled_from(STATES)),
                draw(st.integers(max(1, vram[model] // 2), vram[model] * 2)),
                draw(st.floats(0, 1000)),
            )
        )
    gpus = []
    for gpu_id, total in zip(gpu_ids, totals, strict=True):
        nvml = None
        if draw(st.booleans()):
            external = draw(st.integers(0, 4 * GIB))
            nvml = max(0, total * GIB - used_mb(gpu_id, workers) - external)
        gpus.append(Gpu(gpu_id, total * GIB, nvml))
    demands = [
        Demand(
            m,
            vram[m],
            draw(st.integers(1, 3)),
            draw(st.integers(1, 6)),
            draw(st.integers(0, 3)),
            draw(st.floats(0, 500)),
        )
        for m in draw(st.lists(st.sampled_from(models), unique=True))
    ]
    reservation = None
    if draw(st.booleans()):
        reservation = Reservation(draw(st.sampled_from(gpu_ids)), draw(st.sampled_from(models)))
    return gpus, workers, demands, reserve, reservation


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.sampled_from([0.0, 100.0, NEVER]))
def test_plans_keep_the_ledger(
    scenario: tuple[list[Gpu], list[Worker], list[Demand], int, Reservation | None], starvation_s: float
) -> None:
    gpus, workers, demands, reserve, reservation = scenario
    result = make_plan(
        gpus, workers, demands, reserve_mb=reserve, starvation_s=starvation_s, reservation=reservation
    )
    after = apply(workers, result, demands, now=2000.0)
    started_on = [gpu_id for _, gpu_id in result.starts]
    by_id = {w.id: w for w in workers}
    vram = {d.model: d.vram_mb for d in demands}

    # (a) Every GPU that received a start stays within total - reserve, by the ledger and by NVML.
    for g in gpus:
        if g.id not in started_on:
            continue
        assert started_on.count(g.id) == 1
        assert not loading_on(g.id, workers)
        assert used_mb(g.id, after) <= g.total_mb - reserve
        if g.free_mb is not None:
            freed = sum(by_id[i].vram_mb for i in result.evictions if by_id[i].gpu_id == g.id)
            placed = sum(vram[m] for m, gpu_id in result.starts if gpu_id == g.id)
            assert g.free_mb + freed - placed >= reserve

    # (b) Only idle, unclaimed workers are evicted.
    assert len(set(result.evictions)) == len(result.evictions)
    for worker_id in result.evictions:
        assert by_id[worker_id].state == "idle"
        assert worker_id not in result.claimed

    # Claims and starts stay within the queue and max_workers.
    for d in demands:
        idle = sum(1 for w in workers if w.model == d.model and w.state == "idle")
        claims = result.claims.get(d.model, 0)
        assert claims <= min(d.queued, idle)
        starts = sum(1 for m, _ in result.starts if m == d.model)
        alive = sum(1 for w in after if w.model == d.model and w.state != "stopping")
        assert starts == 0 or alive <= d.max_workers
        assert starts <= max(0, d.queued - claims)
        if d.model in result.unplaceable:
            assert starts == 0
    assert sum(result.claims.values()) == len(result.claimed)

    # A standing reservation keeps other models' starts off its GPU while its model waits.
    held = {g.id: g for g in gpus}.get(reservation.gpu_id) if reservation is not None else None
    if (
        reservation is not None
        and held is not None
        and reservation.model in vram
        and vram[reservation.model] + reserve <= held.total_mb
        and reservation.model not in result.claims
        and all(m != reservation.model for m, _ in result.starts)
    ):
        for m, gpu_id in result.starts:
            assert gpu_id != reservation.gpu_id or m == reservation.model
    if result.reservation is not None:
        assert result.reservation.model in vram
        assert result.reservation.model not in result.claims
        assert all(m != result.reservation.model for m, _ in result.starts)


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_plans_do_not_depend_on_input_order(
    scenario: tuple[list[Gpu], list[Worker], list[Demand], int, Reservation | None], rnd: random.Random
) -> None:
    gpus, workers, demands, reserve, reservation = scenario
    first = make_plan(gpus, workers, demands, reserve_mb=reserve, starvation_s=0, reservation=reservation)
    rnd.shuffle(gpus)
    rnd.shuffle(workers)
    rnd.shuffle(demands)
    again = make_plan(gpus, workers, demands, reserve_mb=reserve, starvation_s=0, reservation=reservation)
    assert first == again


def _step(workers: list[Worker], now: float) -> list[Worker]:
    """Time passes: loads finish, jobs finish, stopping workers exit."""
    out = []
    for w in workers:
        if w.state == "stopping":
            continue
        if w.state in ("loading", "busy"):
            w = dataclasses.replace(w, state="idle", last_used=now)
        out.append(w)
    return out


@st.composite
def simulations(
    draw: st.DrawFn,
) -> tuple[
    list[tuple[str, int, int]], dict[str, int], dict[str, int], list[Worker], int, Demand, list[list[Demand]]
]:
    reserve = draw(st.sampled_from([0, 1024]))
    gpus = [
        (f"g{i}", total * GIB, draw(st.integers(0, 2 * GIB)) if draw(st.booleans()) else -1)
        for i, total in enumerate(draw(st.lists(st.sampled_from([8, 16, 24, 40]), min_size=1, max_size=3)))
    ]
    # The tracked model fits at least one GPU even with the memory held outside vramq there.
    room = max(total - reserve - max(external, 0) for _, total, external in gpus)
    tracked = Demand("tracked", draw(st.integers(256, room)), draw(st.integers(1, 2)), 1, 5, 0.0)
    others = [f"o{i}" for i in range(draw(st.integers(0, 4)))]
    vram = {m: draw(st.integers(256, 40 * GIB)) for m in others}
    vram[tracked.model] = tracked.vram_mb
    max_workers = {m: draw(st.integers(1, 3)) for m in others}
    workers: list[Worker] = []
    for j in range(draw(st.integers(0, 8))):
        model = draw(st.sampled_from([*others, tracked.model]))
        gpu_id, total, _ = draw(st.sampled_from(gpus))
        if used_mb(gpu_id, workers) + vram[model] > total:
            continue
        workers.append(Worker(f"w{j}", model, gpu_id, draw(st.sampled_from(STATES)), vram[model], 0.0))
    rounds: list[list[Demand]] = []
    steady = draw(st.booleans())  # the same work every round: warm workers of others never go idle
    for _ in range(ROUNDS):
        if steady and rounds:
            rounds.append(rounds[0])
            continue
        picked = draw(st.lists(st.sampled_from(others), unique=True)) if others else []
        rounds.append(
            [
                Demand(m, vram[m], max_workers[m], draw(st.integers(1, 4)), draw(st.integers(0, 5)), 1.0)
                for m in picked
            ]
        )
    return gpus, vram, max_workers, workers, reserve, tracked, rounds


# Round 1: the tracked job is blocked, its GPU is reserved. Round 2: what ran or loaded there is idle
# now, is not reused but evicted, and the tracked model starts. Round 3: its worker is ready and claimed.
ROUNDS = 3


@settings(max_examples=300, deadline=None)
@given(simulations())
def test_a_job_that_fits_an_empty_gpu_is_claimed_in_bounded_rounds(
    sim: tuple[
        list[tuple[str, int, int]],
        dict[str, int],
        dict[str, int],
        list[Worker],
        int,
        Demand,
        list[list[Demand]],
    ],
) -> None:
    gpu_specs, _vram, _max, workers, reserve, tracked, rounds = sim
    reservation: Reservation | None = None
    for n, others in enumerate(rounds):
        now = 10.0 * (n + 1)
        gpus = [
            Gpu(gpu_id, total, None if external < 0 else total - used_mb(gpu_id, workers) - external)
            for gpu_id, total, external in gpu_specs
        ]
        # The tracked job is the oldest job of the highest priority, and it is still queued.
        demands = [dataclasses.replace(tracked, oldest_wait_s=1000.0 + now), *others]
        result = plan(
            gpus, workers, demands, reserve_mb=reserve, now=now, starvation_s=0.0, reservation=reservation
        )
        if result.claims.get(tracked.model, 0) > 0:
            return
        reservation = result.reservation
        workers = _step(apply(workers, result, demands, now), now)
    raise AssertionError(f"the tracked job was not claimed within {ROUNDS} rounds")
