"""Mesh models: real tools on real files.

- ``mesh.smooth`` (``SmoothAdapter``): Laplacian smoothing with torch, on the worker's device
  (CUDA when placed on a GPU). Inputs: ``mesh``, ``iterations`` (default 10), ``lambda`` (default 0.5).
- ``mesh.simplify`` (``SimplifyAdapter``): quadric decimation (fast-simplification) to ``target_faces``.
- ``mesh.uv_unwrap`` (``UVUnwrapAdapter``): a UV atlas with xatlas; the output carries UVs.

Each reads the uploaded mesh (OBJ, GLB/glTF, PLY, STL, OFF), writes ``mesh.glb`` and ``mesh.obj`` (plus
``mesh.mtl`` for the UV output) to the job's output directory, and returns a summary: vertices, faces,
input_vertices, input_faces, timings {load_s, compute_s, export_s}, device. Only the geometry of the
input is used (materials and textures are dropped), so loading never depends on image libraries.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import trimesh

from workers.adapter import Adapter, Context, InputFile, InvalidInput

_tm: Any = trimesh  # trimesh is only partly annotated; its untyped constructors are called through this

MESH_TYPES = ("obj", "glb", "gltf", "ply", "stl", "off")
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _input_file(inputs: dict[str, Any], key: str = "mesh") -> InputFile:
    value = inputs.get(key)
    if not isinstance(value, InputFile):
        raise InvalidInput(f"inputs.{key} must be an uploaded file ({{'file': '<id>'}})")
    return value


def _geometry(loaded: Any) -> tuple[FloatArray, IntArray]:
    """Vertices and triangles of whatever trimesh loaded, scene transforms applied, visuals ignored."""
    if isinstance(loaded, trimesh.Trimesh):
        return np.asarray(loaded.vertices, dtype=np.float64), np.asarray(loaded.faces, dtype=np.int64)
    parts: list[tuple[FloatArray, IntArray]] = []
    if isinstance(loaded, trimesh.Scene):
        for node in loaded.graph.nodes_geometry:
            transform, geometry_name = loaded.graph[node]
            geom = loaded.geometry.get(geometry_name)
            if isinstance(geom, trimesh.Trimesh) and len(geom.faces):
                verts = trimesh.transformations.transform_points(np.asarray(geom.vertices), transform)
                parts.append((np.asarray(verts, dtype=np.float64), np.asarray(geom.faces, dtype=np.int64)))
    if not parts:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    offsets = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    vertices = np.concatenate([v for v, _ in parts])
    faces = np.concatenate([f + off for (_, f), off in zip(parts, offsets, strict=True)])
    return vertices, faces


def load_mesh(file: InputFile) -> trimesh.Trimesh:
    """A clean triangle mesh (duplicate vertices merged) from an uploaded file, or InvalidInput."""
    ext = file.suffix
    if ext not in MESH_TYPES:
        raise InvalidInput(
            f"{file.name}: unsupported mesh type {ext or '(none)'!r}; expected one of {', '.join(MESH_TYPES)}"
        )
    try:
        with Path(file.path).open("rb") as f:
            loaded = trimesh.load(f, file_type=ext, process=False)
    except OSError as exc:
        raise InvalidInput(f"{file.name}: cannot read the file: {exc.strerror}") from None
    except Exception as exc:
        raise InvalidInput(f"{file.name}: not a valid {ext} file ({type(exc).__name__}: {exc})") from None
    vertices, faces = _geometry(loaded)
    if len(faces) == 0 or len(vertices) == 0:
        raise InvalidInput(f"{file.name}: the file holds no triangle mesh (no faces)")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise InvalidInput(f"{file.name}: faces must be triangles")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise InvalidInput(f"{file.name}: faces refer to vertices that do not exist")
    if not np.isfinite(vertices).all():
        raise InvalidInput(f"{file.name}: vertex coordinates must be finite numbers")
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=True)
    if len(mesh.faces) == 0:
        raise InvalidInput(f"{file.name}: every face is degenerate")
    return mesh


def export_mesh(mesh: trimesh.Trimesh, output_dir: Path) -> None:
    """Write ``mesh.glb`` and ``mesh.obj`` (with ``mesh.mtl`` when the mesh has UVs)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    glb = mesh.export(file_type="glb")
    assert isinstance(glb, bytes)
    (output_dir / "mesh.glb").write_bytes(glb)
    has_uv = isinstance(mesh.visual, trimesh.visual.TextureVisuals) and mesh.visual.uv is not None
    if has_uv:
        text, extra = _tm.exchange.obj.export_obj(
            mesh, include_texture=True, return_texture=True, mtl_name="mesh.mtl"
        )
        (output_dir / "mesh.obj").write_text(text)
        for name, data in extra.items():
            (output_dir / Path(name).name).write_bytes(data)
    else:
        obj = mesh.export(file_type="obj", include_normals=False)
        assert isinstance(obj, str)
        (output_dir / "mesh.obj").write_text(obj)


def _summary(
    mesh: trimesh.Trimesh, source: trimesh.Trimesh, timings: dict[str, float], device: str
) -> dict[str, Any]:
    return {
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "input_vertices": len(source.vertices),
        "input_faces": len(source.faces),
        "timings": {k: round(v, 6) for k, v in timings.items()},
        "device": device,
    }


def _int_input(inputs: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int:
    raw = inputs.get(key, default)
    if raw is None:
        raise InvalidInput(f"inputs.{key} is required")
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(raw):
        raise InvalidInput(f"inputs.{key} must be an integer")
    if not lo <= int(raw) <= hi:
        raise InvalidInput(f"inputs.{key} must be between {lo} and {hi}")
    return int(raw)


class SmoothAdapter(Adapter):
    """Laplacian smoothing: each iteration moves each vertex ``lambda`` of the way to its neighbours' mean."""

    def __init__(self) -> None:
        self.device = "cpu"

    def load(self, device: str) -> None:
        import torch

        self.device = device if device.startswith("cuda") else "cpu"
        if self.device.startswith("cuda"):
            torch.zeros(1, device=self.device)  # creates the CUDA context now, not in the first job
            torch.cuda.synchronize()

    def run(self, inputs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        import torch

        iterations = _int_input(inputs, "iterations", 10, 1, 1000)
        lam_raw = inputs.get("lambda", 0.5)
        if isinstance(lam_raw, bool) or not isinstance(lam_raw, int | float) or not 0 < lam_raw <= 1:
            raise InvalidInput("inputs.lambda must be a number in (0, 1]")
        lam = float(lam_raw)
        t0 = time.perf_counter()
        source = load_mesh(_input_file(inputs))
        t1 = time.perf_counter()

        dev = torch.device(self.device)
        n = len(source.vertices)
        v = torch.as_tensor(np.asarray(source.vertices), dtype=torch.float32, device=dev)
        f = torch.as_tensor(np.asarray(source.faces), dtype=torch.long, device=dev)
        edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        edges = torch.cat([edges, edges.flip(1)])
        keys = torch.unique(edges[:, 0] * n + edges[:, 1])  # each undirected edge once per direction
        rows, cols = keys // n, keys % n
        ones = torch.ones(len(keys), dtype=torch.float32, device=dev)
        # Sorted unique keys are already coalesced, and valid by construction: no invariant check.
        adjacency = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), ones, (n, n), check_invariants=False, is_coalesced=True
        )
        degree = torch.zeros(n, dtype=torch.float32, device=dev).index_add_(0, rows, ones)
        has_neighbours = (degree > 0).unsqueeze(1)
        inv_degree = (1.0 / degree.clamp(min=1.0)).unsqueeze(1)
        for i in range(iterations):
            ctx.check_cancelled()
            mean = torch.where(has_neighbours, torch.sparse.mm(adjacency, v) * inv_degree, v)
            v = v + lam * (mean - v)
            ctx.progress((i + 1) / iterations * 0.95, f"iteration {i + 1}/{iterations}")
        vertices = v.to("cpu", dtype=torch.float64).numpy()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()

        mesh = trimesh.Trimesh(vertices=vertices, faces=np.asarray(source.faces), process=False)
        export_mesh(mesh, ctx.output_dir)
        t3 = time.perf_counter()
        ctx.progress(1.0)
        out = _summary(mesh, source, {"load_s": t1 - t0, "compute_s": t2 - t1, "export_s": t3 - t2}, str(dev))
        out.update(iterations=iterations, **{"lambda": lam})
        return out


class SimplifyAdapter(Adapter):
    """Quadric edge-collapse decimation down to about ``target_faces`` triangles."""

    def __init__(self) -> None:
        self.device = "cpu"

    def load(self, device: str) -> None:
        self.device = device

    def run(self, inputs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        import fast_simplification

        target = _int_input(inputs, "target_faces", None, 4, 100_000_000)
        t0 = time.perf_counter()
        source = load_mesh(_input_file(inputs))
        t1 = time.perf_counter()
        ctx.progress(0.1, "loaded")
        ctx.check_cancelled()
        if target >= len(source.faces):
            mesh = source  # already at or below the target: nothing to remove
        else:
            points, faces = fast_simplification.simplify(
                np.asarray(source.vertices, dtype=np.float64),
                np.asarray(source.faces, dtype=np.int64),
                target_count=target,
            )
            mesh = trimesh.Trimesh(vertices=points, faces=faces, process=True)
            if len(mesh.faces) == 0:
                raise InvalidInput(f"cannot simplify this mesh to {target} faces: nothing would remain")
        t2 = time.perf_counter()
        ctx.progress(0.8, "simplified")
        ctx.check_cancelled()
        export_mesh(mesh, ctx.output_dir)
        t3 = time.perf_counter()
        ctx.progress(1.0)
        out = _summary(mesh, source, {"load_s": t1 - t0, "compute_s": t2 - t1, "export_s": t3 - t2}, "cpu")
        out["target_faces"] = target
        return out


class UVUnwrapAdapter(Adapter):
    """A UV atlas (xatlas): vertices are split along chart seams; the output carries texture coordinates."""

    def __init__(self) -> None:
        self.device = "cpu"

    def load(self, device: str) -> None:
        import xatlas  # noqa: F401  (fail at load, not in the first job, when it is missing)

        self.device = device

    def run(self, inputs: dict[str, Any], ctx: Context) -> dict[str, Any]:
        import xatlas

        t0 = time.perf_counter()
        source = load_mesh(_input_file(inputs))
        t1 = time.perf_counter()
        ctx.progress(0.1, "loaded")
        ctx.check_cancelled()
        vmapping, indices, uvs = xatlas.parametrize(
            np.asarray(source.vertices, dtype=np.float32), np.asarray(source.faces, dtype=np.uint32)
        )
        material = _tm.visual.material.PBRMaterial(
            name="mesh", baseColorFactor=[204, 204, 204, 255], metallicFactor=0.0, roughnessFactor=1.0
        )
        mesh = trimesh.Trimesh(
            vertices=np.asarray(source.vertices)[vmapping],
            faces=np.asarray(indices, dtype=np.int64),
            visual=_tm.visual.TextureVisuals(uv=np.asarray(uvs), material=material),
            process=False,
        )
        t2 = time.perf_counter()
        ctx.progress(0.8, "unwrapped")
        ctx.check_cancelled()
        export_mesh(mesh, ctx.output_dir)
        t3 = time.perf_counter()
        ctx.progress(1.0)
        uv = np.asarray(uvs)
        out = _summary(mesh, source, {"load_s": t1 - t0, "compute_s": t2 - t1, "export_s": t3 - t2}, "cpu")
        out["uv_bounds"] = [float(uv.min()) if len(uv) else 0.0, float(uv.max()) if len(uv) else 0.0]
        out["seam_vertices"] = len(mesh.vertices) - len(source.vertices)
        return out


__all__ = ["SimplifyAdapter", "SmoothAdapter", "UVUnwrapAdapter", "export_mesh", "load_mesh"]
