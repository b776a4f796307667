"""The command line end to end: real ``vramq serve`` processes on a test database, the CLI as a subprocess.

Run them alone with ``pytest tests/e2e/test_cli.py``. Tests that need the HTTP API skip themselves while
``api/main.py`` or ``scheduler/service.py`` is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"

needs_server = pytest.mark.skipif(
    not (ROOT / "api" / "main.py").exists() or not (ROOT / "scheduler" / "service.py").exists(),
    reason="needs the HTTP API (api/main.py) and the scheduler service (scheduler/service.py)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(dsn: str | None, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "VRAMQ_URL", "VRAMQ_KEY") and not k.startswith("VRAMQ_")
    }
    env.update({"VRAMQ_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"})
    if dsn is not None:
        env["VRAMQ_DATABASE_URL"] = dsn
    env.update(extra)
    return env


def vramq(
    *args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vramq", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def poll(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass
class Server:
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def cli(self, *args: str, key: str | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "VRAMQ_URL": self.url}
        if key is not None:
            env["VRAMQ_KEY"] = key
        return vramq(*args, env=env, **kw)


@contextlib.contextmanager
def serve(dsn: str, tmp: Path, **extra: str) -> Iterator[Server]:
    port = free_port()
    settings = {
        "VRAMQ_AUTH": "disabled",
        "VRAMQ_GPUS": "fake:1x24GiB",
        "VRAMQ_POOL": f"e2e-{uuid.uuid4().hex[:8]}",
        **extra,
    }
    env = base_env(dsn, tmp / "data", **settings)
    log = tmp / f"serve-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vramq", "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", env, proc, log)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"vramq serve exited with {proc.returncode}:\n{server.output()}")
            try:
                return httpx.get(server.url + "/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        poll(ready, timeout=60, what="vramq serve to answer /readyz")
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def server(dsn: str, tmp_path: Path) -> Iterator[Server]:
    with serve(dsn, tmp_path) as s:
        yield s


def small_mesh(tmp_path: Path) -> Path:
    path = DATA / "icosphere.obj"
    if path.exists():
        return path
    import trimesh

    path = tmp_path / "icosphere.obj"
    path.write_text(trimesh.creation.icosphere(subdivisions=2).export(file_type="obj"))
    return path


def job_json(server: Server, job_id: str, key: str | None = None) -> dict[str, Any]:
    res = server.cli("jobs", "show", job_id, "--json", key=key)
    assert res.returncode == 0, res.stderr
    body: dict[str, Any] = json.loads(res.stdout)
    return body


# -- without the HTTP API ------------------------------------------------------------------------------


def test_serve_refuses_an_unmigrated_database(empty_dsn: str, tmp_path: Path) -> None:
    env = base_env(empty_dsn, tmp_path / "data", VRAMQ_AUTH="disabled")
    res = vramq("serve", "--port", str(free_port()), env=env)
    assert res.returncode == 1
    assert "run `vramq migrate`" in res.stderr
    res = vramq("scheduler", env=env)
    assert res.returncode == 1 and "run `vramq migrate`" in res.stderr


def test_migrate_then_db_url(empty_dsn: str, tmp_path: Path) -> None:
    env = base_env(empty_dsn, tmp_path / "data")
    res = vramq("migrate", env=env)
    assert res.returncode == 0, res.stderr
    assert "schema revision" in res.stdout
    res = vramq("db", "url", env=env)
    assert res.returncode == 0 and res.stdout.strip().split("?")[0] == empty_dsn.split("?")[0]
    res = vramq("db", "stop", env=env)
    assert res.returncode == 2  # an external server is not vramq's to stop


def test_keys_create_ls_revoke(dsn: str, tmp_path: Path) -> None:
    env = base_env(dsn, tmp_path / "data")
    res = vramq("keys", "create", "--tenant", "acme", "--scopes", "submit,read", "--name", "ci", env=env)
    assert res.returncode == 0, res.stderr
    secret = res.stdout.strip().splitlines()[-1]
    assert secret and " " not in secret
    res = vramq("keys", "ls", "--tenant", "acme", "--json", env=env)
    keys = json.loads(res.stdout)
    assert [(k["tenant"], k["name"], sorted(k["scopes"])) for k in keys] == [
        ("acme", "ci", ["read", "submit"])
    ]
    assert secret not in res.stdout
    key_id = keys[0]["id"]
    assert vramq("keys", "revoke", key_id, env=env).returncode == 0
    res = vramq("keys", "revoke", key_id, env=env)
    assert res.returncode == 1 and "no active key" in res.stderr
    res = vramq("keys", "create", "--tenant", "acme", "--scopes", "submit,superuser", env=env)
    assert res.returncode == 2 and "unknown scope" in res.stderr


# -- against a running server --------------------------------------------------------------------------


@needs_server
@pytest.mark.timeout(300)
def test_submit_mesh_wait_downloads_a_glb(server: Server, tmp_path: Path) -> None:
    import trimesh

    mesh = small_mesh(tmp_path)
    out_dir = tmp_path / "out"
    res = server.cli(
        "submit",
        "mesh.smooth",
        "--file",
        f"mesh=@{mesh}",
        "-i",
        "iterations=3",
        "--wait",
        "-o",
        str(out_dir),
        timeout=240,
    )
    assert res.returncode == 0, f"{res.stderr}\n--- server ---\n{server.output()}"
    lines = res.stdout.strip().splitlines()
    job_id = lines[0]
    uuid.UUID(job_id)
    paths = [Path(p) for p in lines[1:]]
    glb = next(p for p in paths if p.suffix == ".glb")
    assert glb.parent == out_dir
    loaded: Any = trimesh.load(glb)
    geometry = loaded.geometry.values() if isinstance(loaded, trimesh.Scene) else [loaded]
    assert sum(len(g.vertices) for g in geometry) > 0
    assert "succeeded" in res.stderr
    assert job_json(server, job_id)["status"] == "succeeded"


@needs_server
@pytest.mark.timeout(300)
def test_failed_job_exits_1_with_its_error(server: Server, tmp_path: Path) -> None:
    res = server.cli(
        "submit",
        "demo.sleep",
        "-i",
        "seconds=0",
        "-i",
        "fail=true",
        "--max-attempts",
        "1",
        "--wait",
        cwd=tmp_path,
        timeout=240,
    )
    assert res.returncode == 1, res.stderr
    assert "failed: model_error" in res.stderr
    res = server.cli("submit", "no.such.model", "-i", "a=1")
    assert res.returncode == 1 and "vramq: error:" in res.stderr


@needs_server
@pytest.mark.timeout(300)
def test_jobs_ls_show_cancel_and_status(server: Server) -> None:
    res = server.cli("submit", "demo.sleep", "-i", "seconds=600", "--priority", "5")
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()

    res = server.cli("jobs", "ls")
    assert res.returncode == 0 and job_id in res.stdout and "demo.sleep" in res.stdout
    res = server.cli("jobs", "ls", "--model", "mesh.smooth", "--json")
    assert res.returncode == 0 and job_id not in res.stdout
    res = server.cli("jobs", "show", job_id)
    assert res.returncode == 0 and job_id in res.stdout

    poll(
        lambda: job_json(server, job_id)["status"] == "running",
        timeout=120,
        what="the job to start running",
    )

    def status() -> dict[str, Any] | None:
        res = server.cli("status", "--json")
        assert res.returncode == 0, res.stderr
        body: dict[str, Any] = json.loads(res.stdout)
        return body if body.get("leaders") and body.get("workers") else None

    body = poll(status, timeout=30, what="a leader and a worker in the status")
    assert body["leaders"][0]["pool"] == server.env["VRAMQ_POOL"]
    assert len(body["gpus"]) == 1
    assert any(w["model"] == "demo.sleep" for w in body["workers"])
    res = server.cli("status")
    assert res.returncode == 0 and "POOL" in res.stdout and "demo.sleep" in res.stdout

    res = server.cli("jobs", "cancel", job_id)
    assert res.returncode == 0, res.stderr
    poll(
        lambda: job_json(server, job_id)["status"] == "cancelled",
        timeout=60,
        what="the running job to be cancelled",
    )
    res = server.cli("jobs", "show", str(uuid.uuid4()))
    assert res.returncode == 1 and "vramq: error:" in res.stderr


@needs_server
@pytest.mark.timeout(300)
def test_keys_work_against_a_server_with_auth(dsn: str, tmp_path: Path) -> None:
    env = base_env(dsn, tmp_path / "data")
    res = vramq("keys", "create", "--tenant", "acme", "--scopes", "submit,read", env=env)
    assert res.returncode == 0, res.stderr
    secret = res.stdout.strip().splitlines()[-1]

    with serve(dsn, tmp_path, VRAMQ_AUTH="required") as server:
        assert httpx.get(server.url + "/api/v1/jobs", timeout=10).status_code == 401
        res = server.cli("jobs", "ls")
        assert res.returncode == 1 and "--key" in res.stderr
        res = server.cli("jobs", "ls", key="vq_not-a-real-key")
        assert res.returncode == 1
        res = server.cli("jobs", "ls", key=secret)
        assert res.returncode == 0, res.stderr
        res = server.cli(
            "submit", "demo.sleep", "-i", "seconds=0", "--wait", key=secret, cwd=tmp_path, timeout=240
        )
        assert res.returncode == 0, f"{res.stderr}\n--- server ---\n{server.output()}"
        res = server.cli("--key", secret, "jobs", "show", res.stdout.strip().splitlines()[0])
        assert res.returncode == 0 and "succeeded" in res.stdout
