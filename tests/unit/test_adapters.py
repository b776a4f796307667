"""Bundled adapters run in-process on real files, plus the pieces of the adapter interface and runtime."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trimesh

from workers import protocol
from workers.adapter import (
    Cancelled,
    Context,
    InputFile,
    InvalidInput,
    classify_exception,
    resolve_inputs,
)
from workers.adapters.demo import SleepAdapter
from workers.adapters.mesh import SimplifyAdapter, SmoothAdapter, UVUnwrapAdapter, load_mesh
from workers.runtime import content_type, list_outputs

DATA = Path(__file__).resolve().parent.parent / "data"
POINTS_PLY = (  # three vertices and no faces: a point cloud
    b"ply\nformat ascii 1.0\nelement vertex 3\n"
    b"property float x\nproperty float y\nproperty float z\nend_header\n0 0 0\n1 0 0\n0 1 0\n"
)


class Recorder:
    def __init__(self) -> None:
        self.updates: list[tuple[float, str]] = []

    def __call__(self, fraction: float, message: str) -> None:
        self.updates.append((fraction, message))


@pytest.fixture
def progress() -> Recorder:
    return Recorder()


@pytest.fixture
def ctx(tmp_path: Path, progress: Recorder) -> Context:
    return Context("job-1", 1, tmp_path / "out", "cpu", send_progress=progress)


def upload(name: str, tmp_path: Path, stored_without_extension: bool = True) -> InputFile:
    """An InputFile as the scheduler hands it over: stored under an opaque name, uploaded as ``name``."""
    src = DATA / name
    dst = tmp_path / ("upload-0001" if stored_without_extension else name)
    shutil.copyfile(src, dst)
    return InputFile(id="f1", name=name, path=dst, size=dst.stat().st_size)


def load_glb(path: Path) -> trimesh.Trimesh:
    mesh = trimesh.load(path, file_type="glb", force="mesh", process=False)
    assert isinstance(mesh, trimesh.Trimesh)
    return mesh


def obj_counts(path: Path) -> dict[str, int]:
    counts = {"v": 0, "vt": 0, "f": 0}
    for line in path.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in counts:
            counts[key] += 1
    return counts


def test_test_meshes_are_small_and_valid(tmp_path: Path) -> None:
    for name, verts in (("icosphere.obj", 642), ("noisy_sphere.ply", 642), ("cube.stl", 8)):
        assert (DATA / name).stat().st_size < 100_000
        mesh = load_mesh(upload(name, tmp_path))
        assert len(mesh.vertices) == verts


# --- mesh.smooth ------------------------------------------------------------------------------------


def roughness(vertices: np.ndarray) -> float:
    radii = np.linalg.norm(vertices - vertices.mean(axis=0), axis=1)
    return float(radii.std() / radii.mean())


def test_smooth_makes_a_noisy_sphere_rounder(tmp_path: Path, ctx: Context, progress: Recorder) -> None:
    adapter = SmoothAdapter()
    adapter.load("cpu")
    source = upload("noisy_sphere.ply", tmp_path)
    result = adapter.run({"mesh": source, "iterations": 5, "lambda": 0.5}, ctx)

    assert result["vertices"] == result["input_vertices"] == 642
    assert result["faces"] == result["input_faces"] == 1280
    assert result["device"] == "cpu"
    assert set(result["timings"]) == {"load_s", "compute_s", "export_s"}
    json.dumps(result)

    out = load_glb(ctx.output_dir / "mesh.glb")
    assert len(out.vertices) == 642 and len(out.faces) == 1280
    before = roughness(np.asarray(load_mesh(source).vertices))
    assert roughness(np.asarray(out.vertices)) < before / 2
    assert obj_counts(ctx.output_dir / "mesh.obj")["v"] == 642
    assert progress.updates[-1][0] == 1.0
    fractions = [f for f, _ in progress.updates]
    assert fractions == sorted(fractions)


def test_smooth_defaults_and_flat_cube(tmp_path: Path, ctx: Context) -> None:
    adapter = SmoothAdapter()
    adapter.load("cpu")
    result = adapter.run({"mesh": upload("cube.stl", tmp_path)}, ctx)
    assert result["iterations"] == 10 and result["lambda"] == 0.5
    assert result["vertices"] == 8
    assert (ctx.output_dir / "mesh.glb").stat().st_size > 0


@pytest.mark.parametrize(
    "extra",
    [
        {"iterations": 0},
        {"iterations": 1.5},
        {"iterations": "3"},
        {"lambda": 0},
        {"lambda": 2},
        {"lambda": True},
    ],
)
def test_smooth_rejects_bad_parameters(tmp_path: Path, ctx: Context, extra: dict[str, Any]) -> None:
    adapter = SmoothAdapter()
    adapter.load("cpu")
    with pytest.raises(InvalidInput):
        adapter.run({"mesh": upload("icosphere.obj", tmp_path), **extra}, ctx)


def test_smooth_notices_cancellation(tmp_path: Path, ctx: Context) -> None:
    adapter = SmoothAdapter()
    adapter.load("cpu")
    ctx.cancel()
    with pytest.raises(Cancelled):
        adapter.run({"mesh": upload("icosphere.obj", tmp_path), "iterations": 100}, ctx)


# --- mesh.simplify ----------------------------------------------------------------------------------


def test_simplify_reaches_the_target(tmp_path: Path, ctx: Context) -> None:
    adapter = SimplifyAdapter()
    adapter.load("cpu")
    result = adapter.run({"mesh": upload("icosphere.obj", tmp_path), "target_faces": 320}, ctx)
    assert result["input_faces"] == 1280
    assert 200 <= result["faces"] <= 340
    out = load_glb(ctx.output_dir / "mesh.glb")
    assert len(out.faces) == result["faces"]
    assert obj_counts(ctx.output_dir / "mesh.obj")["f"] == result["faces"]


def test_simplify_above_the_face_count_is_a_no_op(tmp_path: Path, ctx: Context) -> None:
    adapter = SimplifyAdapter()
    adapter.load("cpu")
    result = adapter.run({"mesh": upload("cube.stl", tmp_path), "target_faces": 100}, ctx)
    assert result["faces"] == result["input_faces"] == 12


def test_simplify_needs_a_target(tmp_path: Path, ctx: Context) -> None:
    adapter = SimplifyAdapter()
    with pytest.raises(InvalidInput, match="target_faces"):
        adapter.run({"mesh": upload("cube.stl", tmp_path)}, ctx)


# --- mesh.uv_unwrap ---------------------------------------------------------------------------------


def test_uv_unwrap_writes_texture_coordinates(tmp_path: Path, ctx: Context) -> None:
    adapter = UVUnwrapAdapter()
    adapter.load("cpu")
    result = adapter.run({"mesh": upload("cube.stl", tmp_path)}, ctx)
    assert result["faces"] == 12
    assert result["vertices"] >= 8  # seams split vertices
    lo, hi = result["uv_bounds"]
    assert 0.0 <= lo <= hi <= 1.0

    out = load_glb(ctx.output_dir / "mesh.glb")
    assert isinstance(out.visual, trimesh.visual.TextureVisuals)
    uv = out.visual.uv
    assert uv is not None and len(uv) == len(out.vertices) == result["vertices"]
    counts = obj_counts(ctx.output_dir / "mesh.obj")
    assert counts["vt"] > 0 and counts["f"] == 12
    assert (ctx.output_dir / "mesh.mtl").exists()


# --- bad input files --------------------------------------------------------------------------------


def bad_file(tmp_path: Path, name: str, data: bytes) -> InputFile:
    path = tmp_path / "bad-upload"
    path.write_bytes(data)
    return InputFile(id="bad", name=name, path=path, size=len(data))


@pytest.mark.parametrize("adapter_cls", [SmoothAdapter, SimplifyAdapter, UVUnwrapAdapter])
@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("garbage.ply", b"\x00\x01 this is not a mesh", "not a valid ply"),
        ("empty.obj", b"", "no triangle mesh"),
        ("broken.obj", b"v 1 2\nf 1 2 3\n", "not a valid obj"),
        ("points.ply", POINTS_PLY, "no triangle mesh"),
        ("mesh.fbx", b"whatever", "unsupported mesh type"),
        ("noext", b"whatever", "unsupported mesh type"),
    ],
)
def test_bad_meshes_are_invalid_input(
    tmp_path: Path, ctx: Context, adapter_cls: type, name: str, data: bytes, match: str
) -> None:
    adapter = adapter_cls()
    adapter.load("cpu")
    with pytest.raises(InvalidInput, match=match):
        adapter.run({"mesh": bad_file(tmp_path, name, data), "target_faces": 10}, ctx)


def test_missing_file_and_wrong_types(tmp_path: Path, ctx: Context) -> None:
    adapter = SimplifyAdapter()
    with pytest.raises(InvalidInput, match="uploaded file"):
        adapter.run({"mesh": {"file": "abc"}, "target_faces": 10}, ctx)
    gone = InputFile(id="x", name="x.obj", path=tmp_path / "missing", size=0)
    with pytest.raises(InvalidInput, match="cannot read"):
        adapter.run({"mesh": gone, "target_faces": 10}, ctx)


# --- demo.sleep in-process --------------------------------------------------------------------------


def test_sleep_zero_is_instant(ctx: Context, progress: Recorder) -> None:
    adapter = SleepAdapter()
    adapter.load("cpu")
    result = adapter.run({"seconds": 0}, ctx)
    assert result["pid"] == os.getpid() and result["slept_s"] < 0.05
    assert progress.updates == [(1.0, "")]


def test_sleep_steps_report_progress(ctx: Context, progress: Recorder) -> None:
    adapter = SleepAdapter()
    adapter.load("cpu")
    ctx._min_interval_s = 0.0  # see every step
    adapter.run({"seconds": 0.03, "steps": 3}, ctx)
    assert [round(f, 3) for f, _ in progress.updates] == [0.333, 0.667, 1.0]


def test_sleep_fail_and_record(tmp_path: Path, ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAMQ_DEMO_RECORD_DIR", str(tmp_path / "rec"))
    monkeypatch.setenv("VRAMQ_DEMO_VRAM_MB", "1234")
    adapter = SleepAdapter()
    adapter.load("cpu")
    assert adapter.measured_vram_mb() == 1234
    with pytest.raises(RuntimeError) as err:
        adapter.run({"seconds": 0, "fail": True}, ctx)
    assert classify_exception(err.value) == "model_error"
    adapter.run({"seconds": 0}, ctx)
    lines = [
        json.loads(x) for x in (tmp_path / "rec" / f"executions-{os.getpid()}.jsonl").read_text().splitlines()
    ]
    assert [(x["event"], x.get("outcome")) for x in lines] == [
        ("start", None),
        ("end", "failed"),
        ("start", None),
        ("end", "ok"),
    ]
    assert all(x["job_id"] == "job-1" and x["attempt"] == 1 and x["pid"] == os.getpid() for x in lines)
    assert lines[1]["end"] >= lines[1]["start"]


def test_sleep_cancel_is_noticed_quickly(
    tmp_path: Path, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMQ_DEMO_RECORD_DIR", str(tmp_path / "rec"))
    adapter = SleepAdapter()
    adapter.load("cpu")
    timer = threading.Timer(0.1, ctx.cancel)
    timer.start()
    with pytest.raises(Cancelled):
        adapter.run({"seconds": 30, "steps": 1}, ctx)
    timer.join()
    last = json.loads((tmp_path / "rec" / f"executions-{os.getpid()}.jsonl").read_text().splitlines()[-1])
    assert last["outcome"] == "cancelled"
    assert last["end"] - last["start"] < 1.0


@pytest.mark.parametrize("how", ["oom", "error"])
def test_sleep_load_failures(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setenv("VRAMQ_DEMO_LOAD_FAIL", how)
    with pytest.raises(RuntimeError) as err:
        SleepAdapter().load("cpu")
    assert classify_exception(err.value) == ("oom" if how == "oom" else "model_error")


def test_sleep_rejects_bad_seconds(ctx: Context) -> None:
    adapter = SleepAdapter()
    adapter.load("cpu")
    for bad in ({"seconds": "soon"}, {"seconds": -1}, {"seconds": float("nan")}):
        with pytest.raises(InvalidInput):
            adapter.run(bad, ctx)


# --- the adapter interface --------------------------------------------------------------------------


def test_classify_exception() -> None:
    import torch

    assert classify_exception(InvalidInput("x")) == "invalid_input"
    assert classify_exception(Cancelled()) == "cancelled"
    assert classify_exception(torch.cuda.OutOfMemoryError("CUDA out of memory")) == "oom"
    assert classify_exception(RuntimeError("CUDA error: out of memory")) == "oom"
    assert classify_exception(MemoryError()) == "oom"
    assert classify_exception(ValueError("bad")) == "model_error"
    assert classify_exception(KeyError("k")) == "model_error"


def test_resolve_inputs(tmp_path: Path) -> None:
    f = tmp_path / "stored"
    f.write_bytes(b"12345")
    inputs = {
        "mesh": {"file": "id1", "path": str(f), "name": "a.obj", "size": 5},
        "more": [{"file": "id2", "path": str(f)}],
        "plain": {"file": "id3"},  # not resolved: left alone
        "n": 3,
    }
    out = resolve_inputs(inputs)
    assert out["mesh"] == InputFile("id1", "a.obj", f, 5)
    assert out["more"][0] == InputFile("id2", "stored", f, 5)
    assert out["plain"] == {"file": "id3"} and out["n"] == 3
    assert out["mesh"].suffix == "obj"


def test_context_throttles_but_always_sends_completion(tmp_path: Path, progress: Recorder) -> None:
    ctx = Context("j", 1, tmp_path, "cpu", send_progress=progress, min_interval_s=60)
    for i in range(1000):
        ctx.progress(i / 1000)
    ctx.progress(1.0, "done")
    ctx.progress(float("nan"))
    ctx.progress(7)
    assert progress.updates == [(0.0, ""), (1.0, "done"), (1.0, "")]
    assert not ctx.cancelled
    ctx.check_cancelled()
    ctx.cancel()
    assert ctx.cancelled
    with pytest.raises(Cancelled):
        ctx.check_cancelled()


def test_context_without_a_sender_is_silent(tmp_path: Path) -> None:
    Context("j", 1, tmp_path, "cpu").progress(0.5)


# --- runtime helpers and the protocol ---------------------------------------------------------------


def test_list_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "mesh.glb").write_bytes(b"glTF")
    (out / "mesh.obj").write_text("v 0 0 0\n")
    (out / "sub" / "meta.json").write_text("{}")
    (out / "preview.png").write_bytes(b"\x89PNG")
    (out / "blob.bin").write_bytes(b"\x00")
    (out / "link").symlink_to("/etc/hostname")
    files = {f.name: f for f in list_outputs(out)}
    assert set(files) == {"mesh.glb", "mesh.obj", "sub/meta.json", "preview.png", "blob.bin"}
    assert files["mesh.glb"].content_type == "model/gltf-binary"
    assert files["mesh.obj"].content_type == "model/obj"
    assert files["sub/meta.json"].content_type == "application/json"
    assert files["preview.png"].content_type == "image/png"
    assert files["blob.bin"].content_type == "application/octet-stream"
    assert files["mesh.glb"].size == 4
    assert files["mesh.glb"].sha256 == hashlib.sha256(b"glTF").hexdigest()
    assert list_outputs(tmp_path / "nothing") == []
    assert content_type("X.GLB") == "model/gltf-binary"


def test_messages_pickle_small() -> None:
    msgs = [
        protocol.Run("j", 1, {"seconds": 1}, "/tmp/o"),
        protocol.Cancel("j"),
        protocol.Stop(),
        protocol.Ready(1, "cpu", None, 0.1),
        protocol.LoadFailed("oom", "x"),
        protocol.Progress("j", 0.5, "half"),
        protocol.Done(
            "j", {"a": 1}, [protocol.OutputFile("mesh.glb", 1, "ab", "model/gltf-binary")], 10, 0.1
        ),
        protocol.Failed("j", "model_error", "RuntimeError: x"),
        protocol.CancelledAck("j"),
    ]
    for msg in msgs:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        assert pickle.loads(data) == msg
        assert len(data) < 400


def test_one_line_messages() -> None:
    assert protocol.one_line(ValueError("bad\n  value")) == "ValueError: bad value"
    assert protocol.one_line(KeyError()) == "KeyError"
    long = protocol.one_line(RuntimeError("x" * 5000))
    assert len(long) == protocol.MAX_MESSAGE_CHARS and long.endswith("...")


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, msg: object) -> None:
        self.sent.append(msg)


class ScriptedAdapter:
    """Not an Adapter subclass: any class with load and run will do."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def load(self, device: str) -> None:
        pass

    def run(self, inputs: dict[str, Any], ctx: Context) -> Any:
        (ctx.output_dir / "note.txt").write_text(str(inputs["mesh"].name))
        ctx.progress(1.0)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"ok": 1}, "Done"),
        ({"bad": float("nan")}, "Failed"),
        ({"bad": object()}, "Failed"),
        (["not", "a", "dict"], "Failed"),
        (InvalidInput("nope"), "Failed"),
        (Cancelled(), "CancelledAck"),
    ],
)
def test_runtime_job_path(tmp_path: Path, result: Any, expected: str) -> None:
    from workers.runtime import _Worker

    conn = FakeConn()
    worker = _Worker(conn, "test.model", "cpu")  # type: ignore[arg-type]
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old attempt")
    f = tmp_path / "in"
    f.write_bytes(b"x")
    inputs = {"mesh": {"file": "id", "path": str(f), "name": "in.obj"}}
    worker.run_job(ScriptedAdapter(result), protocol.Run("j1", 2, inputs, str(out)))
    kinds = [type(m).__name__ for m in conn.sent]
    assert kinds == [expected]  # the 100% progress is implied by the outcome
    last = conn.sent[-1]
    if isinstance(last, protocol.Done):
        assert [o.name for o in last.outputs] == ["note.txt"]  # the stale file was removed first
        assert last.result == {"ok": 1}
    if isinstance(last, protocol.Failed):
        assert last.kind == ("invalid_input" if isinstance(result, InvalidInput) else "model_error")
        assert "\n" not in last.message
    assert worker.current is None


def test_runtime_cancel_before_start(tmp_path: Path) -> None:
    from workers.runtime import _Worker

    conn = FakeConn()
    worker = _Worker(conn, "test.model", "cpu")  # type: ignore[arg-type]
    worker.cancelled_ids.add("j1")
    worker.run_job(ScriptedAdapter({"ok": 1}), protocol.Run("j1", 1, {}, str(tmp_path / "o")))
    assert [type(m).__name__ for m in conn.sent] == ["CancelledAck"]
