"""The command line without a server: argument and input parsing, exit codes, the SSE follower, downloads.

HTTP is answered by ``httpx.MockTransport`` handlers that play the REST contract.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from vramq import cli
from vramq.client import Client, ClientError, parse_sse, safe_output_name

JOB_ID = "0b9c2a4e-8f1d-4c57-9a43-4f7f0e6b2d11"


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mock_client(monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]) -> None:
    def make(args: Any) -> Client:
        return Client("http://vramq.test", None, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(cli, "_client", make)


def sse(*events: dict[str, Any], name: str = "status") -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(e)}\n\n" for e in events).encode()


# -- values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n=3", ("n", 3)),
        ("x=0.5", ("x", 0.5)),
        ("flag=true", ("flag", True)),
        ("none=null", ("none", None)),
        ('obj={"a": [1, 2]}', ("obj", {"a": [1, 2]})),
        ("name=hello world", ("name", "hello world")),
        ("s=", ("s", "")),
        ('quoted="3"', ("quoted", "3")),
        ("expr=a=b", ("expr", "a=b")),
        ("nan=NaN", ("nan", "NaN")),
        ("inf=Infinity", ("inf", "Infinity")),
        (" k =1", ("k", 1)),
    ],
)
def test_parse_input(text: str, expected: tuple[str, Any]) -> None:
    assert cli.parse_input(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=3", ""])
def test_parse_input_rejects(text: str) -> None:
    with pytest.raises(cli.CliError) as info:
        cli.parse_input(text)
    assert info.value.code == 2


def test_parse_file(tmp_path: Path) -> None:
    f = tmp_path / "m.obj"
    f.write_text("v 0 0 0\n")
    assert cli.parse_file(f"mesh=@{f}") == ("mesh", f)
    assert cli.parse_file(f"mesh={f}") == ("mesh", f)
    for bad in ("mesh", "mesh=@", "=@x", f"mesh=@{tmp_path / 'missing.obj'}", f"mesh=@{tmp_path}"):
        with pytest.raises(cli.CliError) as info:
            cli.parse_file(bad)
        assert info.value.code == 2


def test_parse_scopes() -> None:
    assert cli.parse_scopes("submit,read") == ["submit", "read"]
    assert cli.parse_scopes(" read , read,admin,") == ["read", "admin"]
    for bad in ("root", "submit,write", "", ","):
        with pytest.raises(cli.CliError) as info:
            cli.parse_scopes(bad)
        assert info.value.code == 2


def test_safe_output_name() -> None:
    assert safe_output_name("mesh.glb") == "mesh.glb"
    assert safe_output_name("textures/albedo.png") == "textures/albedo.png"
    for bad in ("../etc/passwd", "a/../../b", "..", ".", "", "/abs", "a\\b", "a//b", "dir/"):
        with pytest.raises(ClientError):
            safe_output_name(bad)


def test_parse_sse() -> None:
    lines = iter(
        [
            ": keep-alive",
            "event: status",
            'data: {"id": "x", "status": "queued", "progress": 0}',
            "",
            "id: 7",
            'data: {"a":',
            "data: 1}",
            "",
            "data: not json",
            "",
            'data: {"tail": true}',
        ]
    )
    events = list(parse_sse(lines))
    assert [e.event for e in events] == ["status", "message", "message", "message"]
    assert events[0].data == {"id": "x", "status": "queued", "progress": 0}
    assert events[1].data == {"a": 1} and events[1].id == "7"
    assert events[2].data == "not json"
    assert events[3].data == {"tail": True}


def test_table_and_bars() -> None:
    text = cli.table(["A", "LONGER"], [["x", None], ["yyyy", 3]])
    assert text.splitlines() == ["A     LONGER", "x     -", "yyyy  3"]
    assert cli.vram_bar(0, 0, 100, width=10) == "[..........]"
    assert cli.vram_bar(50, 70, 100, width=10) == "[#####==...]"
    assert cli.vram_bar(100, 100, 100, width=10) == "[##########]"
    assert cli.vram_bar(10, 0, None, width=4) == "[????]"
    assert cli.age(None) == "-"
    assert cli.age("2020-01-01T00:00:00+00:00").endswith("d")


def test_format_status() -> None:
    body = {
        "leaders": [
            {
                "pool": "gpu-host-1",
                "term": 12,
                "host": "box",
                "pid": 4242,
                "since": "2020-01-01T00:00:00Z",
                "heartbeat_at": "2020-01-01T00:00:00Z",
                "stale": True,
            }
        ],
        "gpus": [
            {
                "pool": "gpu-host-1",
                "id": "0",
                "name": "fake",
                "total_mb": 24576,
                "used_mb": 1024,
                "ledger_mb": 2048,
            }
        ],
        "workers": [
            {"id": "w1", "model": "mesh.smooth", "gpu": "0", "state": "idle", "vram_mb": 900, "pid": 99}
        ],
        "queue": {"mesh.smooth": 3},
    }
    text = cli.format_status(body)
    assert "gpu-host-1" in text and "STALE" in text
    assert "24.0G" in text and "[#=" in text
    assert "mesh.smooth" in text and "idle" in text
    empty = cli.format_status({"leaders": [], "gpus": [], "workers": [], "queue": {}})
    assert "no scheduler leader" in empty and "queue empty" in empty


def test_progress_line_plain_lines_are_throttled() -> None:
    buf = io.StringIO()
    line = cli.ProgressLine(buf, tty=False)
    line.update("queued", 0.0)
    line.update("queued", 0.0)
    line.update("running", 0.01, "loading")
    line.update("running", 0.02, "loading")  # same 10 % bucket, same message: nothing
    line.update("running", 0.55, "step 5")
    line.update("succeeded", 0.9)
    assert buf.getvalue().splitlines() == [
        "queued 0%",
        "running 1% loading",
        "running 55% step 5",
        "succeeded 100%",
    ]


def test_progress_line_tty_redraws_one_line() -> None:
    buf = io.StringIO()
    line = cli.ProgressLine(buf, tty=True)
    line.update("running", 0.5, "halfway")
    line.finish()
    out = buf.getvalue()
    assert out.startswith("\r\x1b[2K") and "50.0%" in out and "halfway" in out and out.endswith("\n")
    assert "\n" not in out[:-1]


# -- exit codes without a server --------------------------------------------------------------------


def test_usage_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["frobnicate"],
        ["jobs", "show", "not-a-uuid"],
        ["jobs", "ls", "--limit", "0"],
        ["jobs", "ls", "--status", "sleeping"],
        ["submit"],
        ["serve", "--port", "70000"],
        ["keys", "create", "--tenant", "t"],
    ):
        code, _, err = run_main(argv, capsys)
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert "error:" in err


def test_bad_input_exits_2_before_any_request(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request expected, got {request.url}")

    mock_client(monkeypatch, handler)
    for argv in (
        ["submit", "demo.sleep", "--input", "seconds"],
        ["submit", "mesh.smooth", "--file", f"mesh=@{tmp_path / 'nope.obj'}"],
        ["submit", "demo.sleep", "--input", "a=1", "--input", "a=2"],
        ["submit", "demo.sleep", "--input", "a=1", "--output-dir", str(tmp_path)],
    ):
        code, _, err = run_main(argv, capsys)
        assert code == 2, argv
        assert err.startswith("vramq: error: ") and len(err.strip().splitlines()) == 1


def test_bad_scopes_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["keys", "create", "--tenant", "acme", "--scopes", "submit,root"], capsys)
    assert code == 2
    assert "unknown scope 'root'" in err


def test_connection_refused(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VRAMQ_KEY", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (
        ["--url", url, "jobs", "ls"],
        ["status", "--url", url],
        ["jobs", "show", JOB_ID, "--url", url],
    ):
        code, _, err = run_main(argv, capsys)
        assert code == 1
        assert f"cannot reach vramq at {url}: is `vramq serve` running?" in err
    monkeypatch.setenv("VRAMQ_URL", url)
    code, _, err = run_main(["status"], capsys)
    assert code == 1 and url in err


def test_server_error_message_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/jobs":
            return httpx.Response(
                422, json={"error": {"code": "unknown_model", "message": "no model 'nope'"}}
            )
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "missing API key"}})

    mock_client(monkeypatch, handler)
    code, out, err = run_main(["submit", "nope", "--input", "a=1"], capsys)
    assert (code, out) == (1, "")
    assert err.strip() == "vramq: error: no model 'nope'"
    code, _, err = run_main(["status"], capsys)
    assert code == 1 and "missing API key" in err and "--key" in err


def test_key_is_sent_as_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"jobs": []})

    with Client("http://vramq.test", "s3cret", transport=httpx.MockTransport(handler)) as client:
        client.jobs()
    assert seen == ["Bearer s3cret"]


def test_url_and_key_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    a = parser.parse_args(["--url", "http://a", "--key", "k", "jobs", "ls"])
    assert (a.url, a.key) == ("http://a", "k")
    b = parser.parse_args(["jobs", "ls", "--url", "http://b"])
    assert b.url == "http://b" and not hasattr(b, "key")
    c = parser.parse_args(["submit", "m", "--key", "k2", "-i", "a=1", "-i", "b=x", "--wait"])
    assert c.key == "k2" and c.input == ["a=1", "b=x"] and c.wait


def test_python_dash_m() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "vramq", "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0
    assert "submit" in res.stdout and "serve" in res.stdout


# -- submit, wait, download against a fake server ---------------------------------------------------


class FakeServer:
    """Plays the REST contract for one job: upload, submit, events (dropping once), job, outputs."""

    def __init__(self, *, final: str = "succeeded", drop_first_stream: bool = True) -> None:
        self.glb = b"glTF-binary-bytes"
        self.final = final
        self.drop_first_stream = drop_first_stream
        self.streams = 0
        self.submitted: dict[str, Any] | None = None
        self.headers: dict[str, str] = {}

    def job(self) -> dict[str, Any]:
        job: dict[str, Any] = {"id": JOB_ID, "model": "mesh.smooth", "attempts": 1}
        if self.streams < 2 and self.drop_first_stream:
            return {**job, "status": "running", "progress": 0.5}
        if self.final == "succeeded":
            return {
                **job,
                "status": "succeeded",
                "progress": 1.0,
                "result": {"vertices": 642},
                "outputs": [
                    {
                        "name": "mesh.glb",
                        "size": len(self.glb),
                        "sha256": hashlib.sha256(self.glb).hexdigest(),
                        "content_type": "model/gltf-binary",
                        "url": f"/api/v1/jobs/{JOB_ID}/outputs/mesh.glb",
                    }
                ],
            }
        return {**job, "status": "failed", "error": {"kind": "oom", "message": "CUDA out of memory"}}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/files" and request.method == "POST":
            assert b'filename="m.obj"' in request.content
            return httpx.Response(201, json={"id": "f-1", "name": "m.obj", "size": 8, "sha256": "x"})
        if path == "/api/v1/jobs" and request.method == "POST":
            self.submitted = json.loads(request.content)
            self.headers = dict(request.headers)
            return httpx.Response(202, json={"id": JOB_ID, "status": "queued", "progress": 0})
        if path == f"/api/v1/jobs/{JOB_ID}/events":
            self.streams += 1
            if self.streams == 1 and self.drop_first_stream:
                # The stream ends before the job does (a proxy timeout, a restart): the client reconnects.
                body = sse({"id": JOB_ID, "status": "queued", "progress": 0}) + b": ping\n\n"
                body += sse({"id": JOB_ID, "status": "running", "progress": 0.5, "progress_message": "half"})
                return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
            final = self.job()
            body = sse({"id": JOB_ID, "status": "running", "progress": 0.9}) + sse(
                {"id": JOB_ID, "status": final["status"], "progress": final.get("progress", 0)}
            )
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        if path == f"/api/v1/jobs/{JOB_ID}":
            return httpx.Response(200, json=self.job())
        if path == f"/api/v1/jobs/{JOB_ID}/outputs/mesh.glb":
            return httpx.Response(200, content=self.glb)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": f"no route {path}"}})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    server = FakeServer()
    mock_client(monkeypatch, server)
    monkeypatch.setattr("vramq.cli.time.sleep", lambda s: None)
    yield server


def test_submit_prints_the_job_id(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    mesh = tmp_path / "m.obj"
    mesh.write_text("v 0 0 0\n")
    code, out, _ = run_main(
        [
            "submit",
            "mesh.smooth",
            "--file",
            f"mesh=@{mesh}",
            "-i",
            "iterations=5",
            "--priority",
            "3",
            "--idempotency-key",
            "abc",
        ],
        capsys,
    )
    assert code == 0
    assert out.strip() == JOB_ID
    assert fake.submitted == {
        "model": "mesh.smooth",
        "inputs": {"mesh": {"file": "f-1"}, "iterations": 5},
        "priority": 3,
    }
    assert fake.headers["idempotency-key"] == "abc"


def test_submit_wait_reconnects_and_downloads(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    code, out, err = run_main(["submit", "mesh.smooth", "-i", "mesh=x", "--wait", "-o", str(out_dir)], capsys)
    assert code == 0, err
    assert fake.streams == 2
    assert out.splitlines() == [JOB_ID, str(out_dir / "mesh.glb")]
    assert (out_dir / "mesh.glb").read_bytes() == fake.glb
    assert "running 50% half" in err and "succeeded 100%" in err
    assert list(out_dir.iterdir()) == [out_dir / "mesh.glb"]  # no partial files left


def test_submit_wait_default_dir_and_json(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(["submit", "mesh.smooth", "-i", "mesh=x", "--wait", "--json"], capsys)
    assert code == 0
    body = json.loads(out)
    assert body["status"] == "succeeded"
    assert body["downloaded"] == [str(Path(JOB_ID) / "mesh.glb")]
    assert (tmp_path / JOB_ID / "mesh.glb").exists()


def test_submit_wait_failure_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server = FakeServer(final="failed", drop_first_stream=False)
    mock_client(monkeypatch, server)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["submit", "mesh.smooth", "-i", "mesh=x", "--wait"], capsys)
    assert code == 1
    assert out.strip() == JOB_ID
    assert f"job {JOB_ID} failed: oom: CUDA out of memory" in err
    assert not (tmp_path / JOB_ID).exists()


def test_download_checks_sha256(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"tampered")

    with Client("http://vramq.test", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ClientError, match="sha256"):
            client.download("/x", tmp_path / "mesh.glb", sha256=hashlib.sha256(b"original").hexdigest())
        assert list(tmp_path.iterdir()) == []
        assert client.download("/x", tmp_path / "ok.bin", sha256=hashlib.sha256(b"tampered").hexdigest()) == 8


def test_wait_gives_up_after_losing_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    clock = [0.0]

    def sleep(s: float) -> None:
        clock[0] += s

    with (
        Client("http://vramq.test", transport=httpx.MockTransport(handler)) as client,
        pytest.raises(ClientError, match="lost contact"),
    ):
        cli.wait_for_job(
            client,
            JOB_ID,
            cli.ProgressLine(io.StringIO(), tty=False),
            give_up_s=30,
            sleep=sleep,
            clock=lambda: clock[0],
        )
    assert clock[0] > 30


def test_wait_stops_on_client_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such job"}})

    with (
        Client("http://vramq.test", transport=httpx.MockTransport(handler)) as client,
        pytest.raises(ClientError, match="no such job"),
    ):
        cli.wait_for_job(client, JOB_ID, cli.ProgressLine(io.StringIO(), tty=False), sleep=lambda s: None)


def test_jobs_commands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/jobs":
            assert request.url.params["status"] == "running" and request.url.params["limit"] == "5"
            return httpx.Response(
                200,
                json={"jobs": [{"id": JOB_ID, "model": "demo.sleep", "status": "running", "progress": 0.25}]},
            )
        if request.url.path.endswith("/cancel"):
            return httpx.Response(200, json={"id": JOB_ID, "status": "running"})
        return httpx.Response(
            200, json={"id": JOB_ID, "status": "failed", "error": {"kind": "timeout", "message": "t"}}
        )

    mock_client(monkeypatch, handler)
    code, out, _ = run_main(["jobs", "ls", "--status", "running", "--limit", "5"], capsys)
    assert code == 0 and "demo.sleep" in out and "25%" in out and out.startswith("ID")
    code, out, _ = run_main(["jobs", "show", JOB_ID], capsys)
    assert code == 0 and "timeout: t" in out
    code, out, _ = run_main(["jobs", "show", JOB_ID, "--json"], capsys)
    assert json.loads(out)["status"] == "failed"
    code, out, _ = run_main(["jobs", "cancel", JOB_ID], capsys)
    assert code == 0 and "cancel requested" in out


def test_deployment_doc_lists_every_setting() -> None:
    from core.settings import Settings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    missing = [name for name in Settings.model_fields if f"`VRAMQ_{name.upper()}`" not in doc]
    assert not missing, f"docs/deployment.md does not describe {missing}"


def test_compose_file_is_valid_yaml() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "docker-compose.yml").read_text())
    services = doc["services"]
    assert services["api"]["environment"]["VRAMQ_ENABLE_SCHEDULER"] == "false"
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["scheduler"]["command"] == ["vramq", "scheduler"]
