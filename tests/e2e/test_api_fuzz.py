"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), bounded to run in
well under a minute: whatever a client sends, the answer is never a 5xx, every JSON error has the one
error shape, and documented bodies match their schemas.

The API runs as a real uvicorn subprocess (authentication disabled) over a database of its own, cloned
from the migrated test template.
"""

from __future__ import annotations

import os
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
from tests.procs import start_api

ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_server(pg_server: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = f"vramq_fuzz_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    tmp = tmp_path_factory.mktemp("fuzz")
    env = {
        **os.environ,
        "VRAMQ_DATABASE_URL": with_database(pg_server, name),
        "VRAMQ_DATA_DIR": str(tmp / "data"),
        "VRAMQ_ENABLE_SCHEDULER": "false",
        "VRAMQ_AUTH": "disabled",
        "VRAMQ_MAX_UPLOAD_BYTES": str(1024 * 1024),
    }
    proc, base = start_api(env, tmp / "uvicorn.log")
    try:
        # Something to find: a job and an upload, so reads by id do not all miss.
        httpx.post(base + "/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 1}})
        httpx.post(base + "/api/v1/files", files={"file": ("a.obj", b"v 0 0 0\n")})
        yield base
    finally:
        proc.stop(timeout=20)
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
