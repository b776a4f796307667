"""Scenario 7: bad input over HTTP, against a real API replica (``uvicorn api.main:app``).

- Schemathesis generates requests for every operation of the OpenAPI schema (valid and invalid ones,
  with a tenant's key): no answer may be a 5xx.
- Hand-written abuse: bodies and uploads over the limits (declared and chunked), malformed JSON, wrong
  types, unknown models, inputs that name server paths, and the ids of another tenant's jobs and files.
- Afterwards the database holds exactly the jobs the API accepted, each with a legal history, and no
  partial upload is left on disk.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from db.connect import connect
from db.dsn import with_database
from tests.procs import Proc, base_env, start_api
from tests.reliability.harness import api_available, scale
from tests.reliability.invariants import RUN_MARK, check_jobs
from tests.reliability.report import REPORT, Row

pytestmark = [pytest.mark.timeout(1800), pytest.mark.chaos]

MAX_BODY = 64 * 1024
MAX_UPLOAD = 128 * 1024
ROW = Row("7. bad input over HTTP")


@dataclass
class Api:
    base: str
    dsn: str
    files_dir: Path
    proc: Proc
    keys: dict[str, str] = field(default_factory=dict)  # tenant -> secret
    accepted: list[uuid.UUID] = field(default_factory=list)

    def client(self, tenant: str | None = "alice") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30)


async def _make_keys(dsn: str) -> dict[str, str]:
    from db import catalog

    conn = await connect(dsn)
    try:
        keys = {}
        for tenant in ("alice", "bob"):
            _, secret = await catalog.create_api_key(
                conn, tenant=tenant, name="rel", scopes=["submit", "read"]
            )
            keys[tenant] = secret
        return keys
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def api(pg_server: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    if not api_available():
        pytest.skip("api.main is not importable yet")
    from db import catalog

    if not hasattr(catalog, "create_api_key"):
        pytest.skip("db.catalog.create_api_key does not exist yet")
    name = f"vramq_bad_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    dsn = with_database(pg_server, name)
    root = tmp_path_factory.mktemp("bad-input")
    env = base_env(dsn, root / "data")
    env.update(
        {
            "VRAMQ_AUTH": "required",
            "VRAMQ_ENABLE_SCHEDULER": "false",
            "VRAMQ_MAX_BODY_BYTES": str(MAX_BODY),
            "VRAMQ_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            RUN_MARK: uuid.uuid4().hex,
        }
    )
    proc, base = start_api(env, root / "api.log", "--log-level", "warning")
    a = Api(base, dsn, root / "data" / "files", proc)
    try:
        a.keys = asyncio.run(_make_keys(dsn))
        REPORT.add(ROW)
        yield a
        assert proc.popen.poll() is None, f"the API died during the scenario:\n{proc.output()[-3000:]}"
    finally:
        proc.stop()
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _job_id(resp: httpx.Response | Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(resp.json()["id"])
    except (ValueError, KeyError, TypeError):
        return None


def test_schemathesis_finds_no_server_error(api: Api) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    per_op = scale(12, 100)
    schema = schemathesis.openapi.from_url(f"{api.base}/openapi.json")
    headers = {"Authorization": f"Bearer {api.keys['alice']}"}
    failures: list[str] = []
    cases = 0

    def fuzz(op: Any, mode: GenerationMode) -> Callable[[], None]:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=per_op,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            nonlocal cases
            cases += 1
            # A capped read: the event stream of a job that exists would not end without a scheduler.
            resp = case.call(base_url=api.base, headers=headers, timeout=5)
            if resp.status_code >= 500:
                failures.append(f"{op.label}: {resp.status_code} {resp.text[:200]} for {case!r}"[:600])
            if op.label == "POST /api/v1/jobs" and resp.status_code in (200, 202):
                jid = _job_id(resp)
                if jid is not None:
                    api.accepted.append(jid)

        return run

    for result in schema.get_all_operations():
        op = result.ok()  # type: ignore[union-attr]  # an invalid operation fails the run here
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz(op, mode)()
            except Unsatisfiable:
                continue  # nothing invalid to send to an operation without parameters
            except Exception as exc:  # a transport error (timeout) is a finding too
                if "events" in op.label and "Timeout" in type(exc).__name__:
                    continue
                failures.append(f"{op.label}: {type(exc).__name__}: {exc}"[:600])
    ROW.faults += cases
    ROW.extra["schemathesis_cases"] = cases
    assert not failures, "server errors:\n" + "\n".join(failures[:20])


def test_oversized_bodies_and_uploads(api: Api) -> None:
    before = set(api.files_dir.rglob("*")) if api.files_dir.exists() else set()
    with api.client() as c:
        big = {"model": "demo.sleep", "inputs": {"seconds": 0}, "metadata": {"x": "a" * (MAX_BODY * 2)}}
        r = c.post("/api/v1/jobs", json=big)
        assert r.status_code == 413, r.text

        def chunks() -> Iterator[bytes]:
            yield b'{"model": "demo.sleep", "inputs": {"seconds": 0}, "metadata": {"x": "'
            for _ in range(MAX_BODY // 1024 * 2):
                yield b"a" * 1024
            yield b'"}}'

        r = c.post("/api/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        r = c.post("/api/v1/files", files={"file": ("big.obj", b"v 0 0 0\n" * (MAX_UPLOAD // 4))})
        assert r.status_code == 413, r.text

        def upload_chunks() -> Iterator[bytes]:
            yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="big.obj"\r\n\r\n'
            for _ in range(MAX_UPLOAD // 1024 * 3):
                yield b"v 0 0 0\n" * 128
            yield b"\r\n--xx--\r\n"

        r = c.post(
            "/api/v1/files",
            content=upload_chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=xx"},
        )
        assert r.status_code == 413, r.text
        ROW.faults += 4
    after = set(api.files_dir.rglob("*")) if api.files_dir.exists() else set()
    leftovers = [p for p in after - before if p.is_file()]
    assert not leftovers, f"refused uploads left files behind: {leftovers}"


def test_malformed_and_mistyped_requests(api: Api) -> None:
    bad_bodies: list[tuple[bytes | dict[str, Any] | list[Any], int]] = [
        (b'{"model": "demo.sleep", "inputs": {"seconds": 1}', 400),
        (b"\xff\xfe not json", 400),
        (b"", 422),
        ([1, 2, 3], 422),
        ({"model": 5, "inputs": {"seconds": 1}}, 422),
        ({"model": "demo.sleep", "inputs": {"seconds": "soon"}}, 422),
        ({"model": "demo.sleep", "inputs": [1]}, 422),
        ({"model": "demo.sleep", "inputs": {"seconds": 1}, "priority": "high"}, 422),
        ({"model": "demo.sleep", "inputs": {"seconds": 1}, "max_attempts": 10**12}, 422),
        ({"model": "demo.sleep", "inputs": {"seconds": 1}, "timeout_s": -1}, 422),
        (b'{"model": "demo.sleep", "inputs": {"seconds": 1e999}}', 422),
        (b'{"model": "demo.sleep", "inputs": {"seconds": NaN}}', 422),
        ({"model": "no.such.model", "inputs": {}}, 422),
        ({"feature": "no-such-feature", "inputs": {}}, 422),
        ({"model": "../../etc/passwd", "inputs": {}}, 422),
        ({"inputs": {"seconds": 1}}, 422),
    ]
    with api.client() as c:
        for body, want in bad_bodies:
            if isinstance(body, bytes):
                r = c.post("/api/v1/jobs", content=body, headers={"Content-Type": "application/json"})
            else:
                r = c.post("/api/v1/jobs", json=body)
            assert r.status_code == want, (body, r.status_code, r.text)
            assert "error" in r.json() and "code" in r.json()["error"], r.text
            ROW.faults += 1
        r = c.post("/api/v1/jobs", json={"model": "no.such.model", "inputs": {}})
        assert r.json()["error"]["code"] == "unknown_model"


def test_inputs_never_name_server_paths(api: Api) -> None:
    payloads: list[Any] = [
        {"file": "/etc/passwd"},
        "/etc/passwd",
        "../../etc/passwd",
        {"file": "../../etc/passwd"},
        {"file": str(uuid.uuid4())},
        {"file": "file:///etc/passwd"},
        {"path": "/etc/passwd"},
        {"file": "00000000-0000-0000-0000-000000000000", "path": "/etc/passwd"},
    ]
    with api.client() as c:
        for mesh in payloads:
            for model in ("mesh.smooth", "mesh.simplify", "mesh.uv_unwrap"):
                inputs: dict[str, Any] = {"mesh": mesh, "target_faces": 10}
                if model != "mesh.simplify":
                    inputs.pop("target_faces")
                r = c.post("/api/v1/jobs", json={"model": model, "inputs": inputs})
                assert r.status_code == 422, (model, mesh, r.status_code, r.text)
                ROW.faults += 1
        # Extra keys on a model that takes none are refused too.
        r = c.post(
            "/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 0, "path": "/etc/passwd"}}
        )
        assert r.status_code == 422, r.text
        for path in ("../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
            for url in (f"/api/v1/files/{path}", f"/api/v1/files/{path}/content"):
                r = c.get(url)
                assert r.status_code in (404, 422), (url, r.status_code)
                assert "root:" not in r.text
        jid = uuid.uuid4()
        r = c.get(f"/api/v1/jobs/{jid}/outputs/../../../../etc/passwd")
        assert r.status_code in (404, 422) and "root:" not in r.text


def test_other_tenants_ids_are_invisible(api: Api) -> None:
    with api.client("alice") as alice, api.client("bob") as bob, api.client(None) as anon:
        r = alice.post("/api/v1/jobs", json={"model": "demo.sleep", "inputs": {"seconds": 0}})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        api.accepted.append(uuid.UUID(jid))
        r = alice.post("/api/v1/files", files={"file": ("cube.obj", b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")})
        assert r.status_code == 201, r.text
        fid = r.json()["id"]
        for method, url in (
            ("GET", f"/api/v1/jobs/{jid}"),
            ("POST", f"/api/v1/jobs/{jid}/cancel"),
            ("GET", f"/api/v1/jobs/{jid}/events"),
            ("GET", f"/api/v1/jobs/{jid}/outputs/mesh.glb"),
            ("GET", f"/api/v1/files/{fid}"),
            ("GET", f"/api/v1/files/{fid}/content"),
        ):
            r = bob.request(method, url)
            assert r.status_code == 404, (method, url, r.status_code, r.text)
            r = anon.request(method, url)
            assert r.status_code == 401, (method, url, r.status_code, r.text)
            ROW.faults += 2
        listed = bob.get("/api/v1/jobs").json()["items"]
        assert all(j["id"] != jid for j in listed)
        r = bob.post("/api/v1/jobs", json={"model": "mesh.smooth", "inputs": {"mesh": {"file": fid}}})
        assert r.status_code == 422, r.text
        r = alice.post("/api/v1/jobs", json={"model": "mesh.smooth", "inputs": {"mesh": {"file": fid}}})
        assert r.status_code == 202, r.text
        api.accepted.append(uuid.UUID(r.json()["id"]))
        assert alice.get(f"/api/v1/jobs/{jid}").json()["status"] == "queued"


def test_zz_database_holds_exactly_what_was_accepted(api: Api) -> None:
    """Last in this module: nothing accepted is missing, nothing refused was stored, histories legal."""

    async def check() -> None:
        conn = await connect(api.dsn)
        try:
            verdict = await check_jobs(
                conn, accepted=api.accepted, record_dir=api.files_dir / "none", require_terminal=False
            )
            stored = {r["id"] for r in await conn.fetch("SELECT id FROM jobs")}
        finally:
            await conn.close()
        ROW.accepted = len(set(api.accepted))
        ROW.lost = len(verdict.lost)
        verdict.assert_ok()
        unexpected = stored - set(api.accepted)
        assert not unexpected, f"{len(unexpected)} jobs stored that the API never answered 2xx for"

    asyncio.run(check())
    ROW.notes = f"{ROW.extra.get('schemathesis_cases', 0)} schemathesis cases + hand-written abuse; no 5xx"
