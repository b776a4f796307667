"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), bounded to run in
well under a minute: whatever a client sends, the answer is never a 5xx, every JSON error has the one
error shape, and documented bodies match their schemas.

The API runs as a real uvicorn subprocess (authentication disabled) over a database of its own, cloned
from the migrated test template.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from api.main import create_app
from core.settings import Settings
from db.dsn import with_database

ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_server(pg_server: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"vramq_fuzz_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    tmp = tmp_path_factory.mktemp("fuzz")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "VRAMQ_DATABASE_URL": with_database(pg_server, name),
        "VRAMQ_DATA_DIR": str(tmp / "data"),
        "VRAMQ_ENABLE_SCHEDULER": "false",
        "VRAMQ_AUTH": "disabled",
        "VRAMQ_MAX_UPLOAD_BYTES": str(1024 * 1024),
    }
    log = open(tmp / "uvicorn.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError((tmp / "uvicorn.log").read_text())
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            select.select([], [], [], 0.05)
        else:
            raise AssertionError("uvicorn did not become ready")
        # Something to find: a job and an upload, so reads by id do not all miss.
        httpx.post(base + "/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 1}})
        httpx.post(base + "/api/v1/files", files={"file": ("a.obj", b"v 0 0 0\n")})
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        output = (tmp / "uvicorn.log").read_text()
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        assert "Traceback" not in output, output


# The schema comes from the app itself (no server needed to collect the tests); requests go to the
# live server.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(auth="disabled", enable_scheduler="false")).openapi()
)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: Any, fuzz_server: str) -> None:
    response = case.call(base_url=fuzz_server, timeout=10)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            response_schema_conformance,
        ],
    )
    assert response.status_code < 500, response.text
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code >= 400 and content_type.startswith("application/json"):
        body = response.json()
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
