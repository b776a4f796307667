"""The ``vramq`` command line: run the processes, manage the database and keys, submit and watch jobs.

Process and database commands (``serve``, ``scheduler``, ``migrate``, ``db``, ``keys``) read the same
settings as every other vramq process (``VRAMQ_*`` environment variables). Job commands (``submit``,
``jobs``, ``status``) talk to a running server over HTTP (``--url``/``VRAMQ_URL``, ``--key``/``VRAMQ_KEY``).

Exit codes: 0 success; 1 the operation failed (server error, job failed, nothing listening);
2 bad usage or configuration; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from vramq.client import API, DEFAULT_URL, Client, ClientError, safe_output_name

if TYPE_CHECKING:
    from core.settings import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = ("queued", "leased", "running", "succeeded", "failed", "cancelled")
SCOPES = ("submit", "read", "admin")


class CliError(Exception):
    """An error to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# -- argument values ---------------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(name)


def parse_input(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: VALUE as JSON when it parses (numbers, booleans, null, objects, lists), else text."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise CliError(f"--input {text!r}: expected KEY=VALUE", EXIT_USAGE)
    try:
        # NaN and Infinity are not JSON: keep them as text rather than send an invalid document.
        parsed: Any = json.loads(value, parse_constant=_no_constants)
    except ValueError:
        parsed = value
    return key, parsed


def parse_file(text: str) -> tuple[str, Path]:
    """``KEY=@PATH`` (the ``@`` is optional): a local file to upload and pass as input KEY."""
    key, sep, value = text.partition("=")
    key = key.strip()
    path_text = value[1:] if value.startswith("@") else value
    if not sep or not key or not path_text:
        raise CliError(f"--file {text!r}: expected KEY=@PATH", EXIT_USAGE)
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise CliError(f"--file {key}: {path_text} is not a readable file", EXIT_USAGE)
    return key, path


def parse_scopes(text: str) -> list[str]:
    scopes: list[str] = []
    for part in text.split(","):
        scope = part.strip()
        if not scope:
            continue
        if scope not in SCOPES:
            raise CliError(f"unknown scope {scope!r}: choose from {', '.join(SCOPES)}", EXIT_USAGE)
        if scope not in scopes:
            scopes.append(scope)
    if not scopes:
        raise CliError(f"--scopes needs at least one of {', '.join(SCOPES)}", EXIT_USAGE)
    return scopes


def _uuid_arg(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a job or key id (a UUID)") from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return n


def _port(text: str) -> int:
    n = _positive_int(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port")
    return n


# -- output helpers ----------------------------------------------------------------------------------


def _out(text: str = "") -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _json(value: Any) -> None:
    _out(json.dumps(value, indent=2, sort_keys=True, default=str))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers], *([("-" if c is None else str(c)) for c in r] for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)
    return "\n".join(lines)


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def age(value: Any, now: datetime | None = None) -> str:
    """How long ago an ISO timestamp was, compactly: ``0.8s``, ``42s``, ``5m``, ``3h``, ``2d``."""
    t = _parse_time(value)
    if t is None:
        return "-"
    s = max(0.0, ((now or datetime.now(UTC)) - t).total_seconds())
    if s < 10:
        return f"{s:.1f}s"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.0f}h"
    return f"{s / 86400:.0f}d"


def _mib(mb: Any) -> str:
    if not isinstance(mb, int | float):
        return "-"
    return f"{mb / 1024:.1f}G" if mb >= 1024 else f"{mb:.0f}M"


def vram_bar(used: Any, ledger: Any, total: Any, width: int = 20) -> str:
    """``[####==......]``: ``#`` measured use, ``=`` booked by the ledger beyond it, ``.`` free."""
    if not isinstance(total, int | float) or total <= 0:
        return "[" + "?" * width + "]"
    u = used if isinstance(used, int | float) else 0
    b = ledger if isinstance(ledger, int | float) else 0
    n_used = min(width, round(width * u / total))
    n_book = min(width - n_used, max(0, round(width * max(b, u) / total) - n_used))
    return "[" + "#" * n_used + "=" * n_book + "." * (width - n_used - n_book) + "]"


def _pct(progress: Any) -> str:
    if not isinstance(progress, int | float) or math.isnan(progress):
        return "-"
    return f"{100 * min(max(progress, 0.0), 1.0):.0f}%"


class ProgressLine:
    """A job's live progress on a terminal (one redrawn line), or plain lines when not a terminal."""

    def __init__(self, stream: IO[str] | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._last: tuple[str, int, str] | None = None
        self._last_at = 0.0
        self._drawn = False

    def render(self, status: str, fraction: float, message: str, width: int) -> str:
        bar_w = 24
        filled = round(bar_w * fraction)
        text = f"{status:<9} [{'#' * filled}{'.' * (bar_w - filled)}] {100 * fraction:5.1f}%"
        if message:
            text += f"  {message}"
        return text[: max(width - 1, 20)]

    def update(self, status: str, progress: Any = None, message: Any = None) -> None:
        fraction = float(progress) if isinstance(progress, int | float) and not math.isnan(progress) else 0.0
        fraction = min(max(fraction, 0.0), 1.0)
        if status == "succeeded":
            fraction = 1.0
        msg = str(message or "")
        if self.tty:
            width = shutil.get_terminal_size((80, 20)).columns
            self.stream.write("\r\x1b[2K" + self.render(status, fraction, msg, width))
            self.stream.flush()
            self._drawn = True
            return
        # Plain lines: on a status change, every 10 %, or a new message at most once a second.
        key = (status, int(fraction * 10), msg)
        now = time.monotonic()
        if self._last is not None:
            if key == self._last:
                return
            if key[:2] == self._last[:2] and now - self._last_at < 1.0:
                return
        self._last, self._last_at = key, now
        line = f"{status} {100 * fraction:.0f}%"
        if msg:
            line += f" {msg}"
        self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        self.finish()
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# -- HTTP commands -----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    url = getattr(args, "url", None) or os.environ.get("VRAMQ_URL") or DEFAULT_URL
    key = getattr(args, "key", None) or os.environ.get("VRAMQ_KEY") or None
    return Client(url, key)


def _message(data: Mapping[str, Any]) -> Any:
    return data.get("progress_message") or data.get("message")


def wait_for_job(
    client: Client,
    job_id: str,
    display: ProgressLine,
    *,
    give_up_s: float = 300.0,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Follow a job's event stream until it ends; reconnect when the stream drops. The final job."""
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    delay = 0.5
    last_contact = clock()
    while True:
        try:
            for event in client.events(job_id):
                last_contact = clock()
                data = event.data
                if not isinstance(data, dict) or "status" not in data:
                    continue
                status = str(data["status"])
                display.update(status, data.get("progress"), _message(data))
                if status in TERMINAL:
                    break
            job = client.job(job_id)  # the stream's end: read the whole job (outputs, error)
            last_contact = clock()
            status = str(job.get("status"))
            display.update(status, job.get("progress"), _message(job))
            if status in TERMINAL:
                display.finish()
                return job
            delay = 0.5  # the stream ended early but the server answers: reconnect soon
        except ClientError as exc:
            if exc.status is not None and exc.status < 500:
                display.finish()
                raise
            if clock() - last_contact > give_up_s:
                display.finish()
                raise ClientError(
                    f"lost contact with {client.url} for {give_up_s:.0f}s: {exc.message}"
                ) from None
            display.note(f"connection lost ({exc.message}); reconnecting")
        sleep(delay)
        delay = min(delay * 2, 5.0)


def download_outputs(client: Client, job: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Download every output of a finished job into ``out_dir``; the paths written."""
    from urllib.parse import quote, urlsplit

    outputs = job.get("outputs") or []
    if not isinstance(outputs, list):
        raise ClientError("the job's outputs are not a list")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        name = safe_output_name(item["name"])
        dest = out_dir.joinpath(*name.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The server's own link when it gives one (only its path: the host it sees may not be ours).
        link = urlsplit(item["url"]) if isinstance(item.get("url"), str) else None
        if link is not None and link.path.startswith("/"):
            path = link.path + (f"?{link.query}" if link.query else "")
        else:
            path = f"{API}/jobs/{quote(str(job['id']), safe='')}/outputs/{quote(name, safe='')}"
        sha = item.get("sha256") if isinstance(item.get("sha256"), str) else None
        client.download(path, dest, sha256=sha)
        paths.append(dest)
    return paths


def cmd_submit(args: argparse.Namespace) -> int:
    inputs: dict[str, Any] = {}
    for text in args.input or []:
        key, value = parse_input(text)
        if key in inputs:
            raise CliError(f"input {key!r} is given twice", EXIT_USAGE)
        inputs[key] = value
    files = [parse_file(text) for text in args.file or []]
    for key, _ in files:
        if key in inputs:
            raise CliError(f"input {key!r} is given twice", EXIT_USAGE)
        inputs[key] = None
    if args.output_dir is not None and not args.wait:
        raise CliError("--output-dir needs --wait", EXIT_USAGE)

    with _client(args) as client:
        for key, path in files:
            uploaded = client.upload(path)
            inputs[key] = {"file": str(uploaded["id"])}
        job = client.submit(
            args.model,
            inputs,
            priority=args.priority,
            pool=args.pool,
            max_attempts=args.max_attempts,
            timeout_s=args.timeout,
            idempotency_key=args.idempotency_key,
        )
        job_id = str(job["id"])
        if not args.wait:
            if args.json:
                _json(job)
            else:
                _out(job_id)
            return 0
        if not args.json:
            _out(job_id)
        try:
            final = wait_for_job(client, job_id, ProgressLine())
        except KeyboardInterrupt:
            _err(
                f"\nstopped waiting; the job goes on "
                f"(`vramq jobs show {job_id}`, `vramq jobs cancel {job_id}`)"
            )
            return EXIT_INTERRUPTED
        status = final.get("status")
        if status != "succeeded":
            if args.json:
                _json(final)
            error = final.get("error")
            err: dict[str, Any] = error if isinstance(error, dict) else {}
            if status == "cancelled":
                _err(f"job {job_id} was cancelled")
            else:
                kind = err.get("kind", "error")
                _err(f"job {job_id} failed: {kind}: {err.get('message', 'no message')}")
            return EXIT_FAILED
        out_dir = Path(args.output_dir) if args.output_dir is not None else Path(job_id)
        paths = download_outputs(client, final, out_dir)
        if args.json:
            _json({**final, "downloaded": [str(p) for p in paths]})
        else:
            for p in paths:
                _out(str(p))
    return 0


def _job_list(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, list):
        items = body
    elif isinstance(body, dict):
        items = next((body[k] for k in ("jobs", "items", "data") if isinstance(body.get(k), list)), [])
    else:
        items = []
    return [j for j in items if isinstance(j, dict)]


def cmd_jobs_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = client.jobs(status=args.status, model=args.model, limit=args.limit)
    if args.json:
        _json(body)
        return 0
    jobs = _job_list(body)
    if not jobs:
        _out("no jobs")
        return 0
    rows = [
        [
            j.get("id"),
            j.get("model") or f"*{j.get('feature', '')}",
            j.get("status"),
            _pct(j.get("progress")),
            j.get("attempts"),
            j.get("priority", "-"),
            age(j.get("created_at")),
        ]
        for j in jobs
    ]
    _out(table(["ID", "MODEL", "STATUS", "PROGRESS", "ATTEMPTS", "PRIORITY", "CREATED"], rows))
    return 0


def format_job(job: Mapping[str, Any]) -> str:
    lines = [
        f"id:        {job.get('id')}",
        f"model:     {job.get('model') or '-'} (feature {job.get('feature', '-')})",
        f"status:    {job.get('status')}  progress {_pct(job.get('progress'))}"
        + (f"  {_message(job)}" if _message(job) else ""),
        f"attempts:  {job.get('attempts', '-')}"
        + (f" of {job['max_attempts']}" if job.get("max_attempts") is not None else ""),
    ]
    if job.get("queue_position") is not None:
        lines.append(f"queue:     position {job['queue_position']}")
    for key in ("pool", "priority", "gpu", "worker"):
        if job.get(key) is not None:
            lines.append(f"{key + ':':<10} {job[key]}")
    for key in ("created_at", "started_at", "finished_at"):
        if job.get(key):
            lines.append(f"{key.removesuffix('_at') + ':':<10} {job[key]} ({age(job[key])} ago)")
    error = job.get("error")
    if isinstance(error, dict) and error:
        lines.append(f"error:     {error.get('kind', 'error')}: {error.get('message', '')}")
    outputs = job.get("outputs")
    if isinstance(outputs, list) and outputs:
        lines.append("outputs:")
        for o in outputs:
            if isinstance(o, dict):
                lines.append(f"  {o.get('name')}  {o.get('size', '?')} bytes  {o.get('content_type', '')}")
    if job.get("result") is not None:
        result = json.dumps(job["result"], indent=2, sort_keys=True)
        lines.append("result:    " + result.replace("\n", "\n  "))
    return "\n".join(lines)


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.id)
    if args.json:
        _json(job)
    else:
        _out(format_job(job))
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.id)
    status = job.get("status")
    if status == "cancelled":
        _out(f"{args.id} cancelled")
    elif status in ("leased", "running"):
        _out(f"{args.id} cancel requested; the job stops shortly")
    elif status in TERMINAL:
        _out(f"{args.id} had already {status}")
    else:
        _out(f"{args.id} {status or 'cancel requested'}")
    return 0


def format_status(body: Mapping[str, Any]) -> str:
    parts: list[str] = []
    leaders = [x for x in body.get("leaders") or [] if isinstance(x, dict)]
    if leaders:
        rows = [
            [
                x.get("pool"),
                x.get("term"),
                x.get("host"),
                x.get("pid"),
                age(x.get("since")),
                age(x.get("heartbeat_at")) + (" STALE" if x.get("stale") else ""),
            ]
            for x in leaders
        ]
        parts.append(table(["POOL", "TERM", "HOST", "PID", "LEADER FOR", "HEARTBEAT"], rows))
    else:
        parts.append("no scheduler leader: jobs wait until a `vramq serve` or `vramq scheduler` runs")
    gpus = [g for g in body.get("gpus") or [] if isinstance(g, dict)]
    if gpus:
        rows = [
            [
                g.get("pool", "-"),
                g.get("id"),
                g.get("name"),
                vram_bar(g.get("used_mb"), g.get("ledger_mb"), g.get("total_mb")),
                _mib(g.get("used_mb")),
                _mib(g.get("ledger_mb")),
                _mib(g.get("total_mb")),
            ]
            for g in gpus
        ]
        headers = ["POOL", "GPU", "NAME", "VRAM (# used, = booked)", "USED", "LEDGER", "TOTAL"]
        parts.append(table(headers, rows))
    workers = [w for w in body.get("workers") or [] if isinstance(w, dict)]
    if workers:
        rows = [
            [w.get("id"), w.get("model"), w.get("gpu"), w.get("state"), _mib(w.get("vram_mb")), w.get("pid")]
            for w in workers
        ]
        parts.append(table(["WORKER", "MODEL", "GPU", "STATE", "VRAM", "PID"], rows))
    else:
        parts.append("no workers")
    queue = body.get("queue")
    if isinstance(queue, dict) and queue:
        parts.append(table(["MODEL", "QUEUED"], sorted(queue.items())))
    else:
        parts.append("queue empty")
    return "\n\n".join(parts)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        body = client.system_status()
    if args.json:
        _json(body)
    else:
        _out(format_status(body))
    return 0


# -- process and database commands -------------------------------------------------------------------


def _settings() -> Settings:
    from core.settings import load_settings

    return load_settings()


def _db_error(dsn: str, exc: BaseException) -> CliError:
    from db.dsn import redacted

    cause = getattr(exc, "orig", None) or exc
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return CliError(f"cannot use the database at {redacted(dsn)}: {first}")


def prepare_database(settings: Settings, *, migrate: bool) -> str:
    """The DSN to run against. The embedded server is started and migrated; an external database is
    migrated only when asked, and otherwise must already be at the current schema."""
    from sqlalchemy.exc import SQLAlchemyError

    from db import migrate as migrations
    from db.dsn import redacted

    if settings.database_url is None:
        from db.embedded import embedded_server

        dsn = embedded_server(settings.data_dir).start()
        try:
            migrations.upgrade(dsn)
        except SQLAlchemyError as exc:
            raise _db_error(dsn, exc) from None
        return dsn
    dsn = settings.database_url
    try:
        if migrate:
            migrations.upgrade(dsn)
            return dsn
        have = migrations.current(dsn)
    except SQLAlchemyError as exc:
        raise _db_error(dsn, exc) from None
    need = migrations.head()
    if have != need:
        state = (
            "has no vramq schema"
            if have is None
            else f"is at schema revision {have}, this vramq needs {need}"
        )
        raise CliError(
            f"the database at {redacted(dsn)} {state}: run `vramq migrate` first (or pass --migrate)"
        )
    return dsn


def _export_dsn(settings: Settings, dsn: str) -> Settings:
    """Make the resolved database the one every child process (uvicorn workers) and reader uses."""
    from core.settings import get_settings

    os.environ["VRAMQ_DATABASE_URL"] = dsn
    get_settings.cache_clear()
    return settings.model_copy(update={"database_url": dsn})


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Migration chatter at start-up says nothing a person needs.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings()
    host = args.host if args.host is not None else settings.host
    port = args.port if args.port is not None else settings.port
    _logging(args.log_level)
    dsn = prepare_database(settings, migrate=args.migrate)
    _export_dsn(settings, dsn)
    import uvicorn

    # The import string (not the app object) lets uvicorn start its worker processes; each one reads
    # VRAMQ_DATABASE_URL from the environment exported above.
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the handler that
    # was there before it. Make that handler a normal exit, so atexit hooks run (the embedded PostgreSQL
    # is stopped when this was its last user) instead of the process dying of the signal.
    previous = signal.signal(signal.SIGTERM, _exit_normally)
    try:
        uvicorn.run(
            "api.main:app",
            host=host,
            port=port,
            workers=args.workers if args.workers > 1 else None,
            log_level=args.log_level,
            # Open SSE streams would otherwise hold a shutdown until their jobs end; clients reconnect.
            timeout_graceful_shutdown=10,
        )
    except KeyboardInterrupt:
        pass  # Ctrl-C: the server has already shut down in order
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_normally(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_scheduler(args: argparse.Namespace) -> int:
    settings = _settings()
    _logging(args.log_level)
    dsn = prepare_database(settings, migrate=args.migrate)
    settings = _export_dsn(settings, dsn)
    from scheduler.service import run_forever

    asyncio.run(run_forever(settings))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from db import migrate as migrations
    from db.dsn import redacted
    from db.embedded import resolve_dsn

    settings = _settings()
    dsn = resolve_dsn(settings.database_url, settings.data_dir)
    try:
        migrations.upgrade(dsn, args.revision)
        rev = migrations.current(dsn)
    except CommandError as exc:
        raise CliError(f"cannot migrate to {args.revision!r}: {exc}", EXIT_USAGE) from None
    except SQLAlchemyError as exc:
        raise _db_error(dsn, exc) from None
    _out(f"{redacted(dsn)} is at schema revision {rev}")
    return 0


def cmd_db_url(args: argparse.Namespace) -> int:
    import atexit

    from db.dsn import redacted

    settings = _settings()
    if settings.database_url is not None:
        _out(settings.database_url if args.show_password else redacted(settings.database_url))
        return 0
    from db.embedded import embedded_server

    server = embedded_server(settings.data_dir)
    was_running = server.running()
    dsn = server.start()
    # Leave the server up for whoever uses this URL; `vramq db stop` stops it.
    server.pin()
    atexit.unregister(server.release)
    if not was_running:
        _err(f"started the embedded PostgreSQL in {server.pgdata}; it runs until `vramq db stop`")
    _out(dsn)
    return 0


def cmd_db_stop(args: argparse.Namespace) -> int:
    settings = _settings()
    if settings.database_url is not None:
        raise CliError(
            "VRAMQ_DATABASE_URL is set: vramq does not manage that server (`db stop` stops the embedded one)",
            EXIT_USAGE,
        )
    from db.embedded import embedded_server

    server = embedded_server(settings.data_dir)
    if not (server.pgdata / "PG_VERSION").exists():
        _out(f"no embedded PostgreSQL in {server.pgdata}")
        return 0
    if not server.running():
        _out("the embedded PostgreSQL is not running")
        return 0
    server.stop()
    _out(f"stopped the embedded PostgreSQL in {server.pgdata}")
    return 0


def _field(record: Any, name: str) -> Any:
    try:
        return record[name]
    except (TypeError, KeyError, IndexError):
        return getattr(record, name, None)


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return "-" if value is None else str(value)


def _run_db(args: argparse.Namespace, work: Callable[[Any], Any]) -> Any:
    """Run ``work(conn)`` on one connection to the configured database (the embedded one by default)."""
    import asyncpg

    from db.connect import connect

    settings = _settings()
    dsn = prepare_database(settings, migrate=False)

    async def go() -> Any:
        try:
            conn = await connect(dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            raise _db_error(dsn, exc) from None
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def cmd_keys_create(args: argparse.Namespace) -> int:
    scopes = parse_scopes(args.scopes)
    tenant = args.tenant.strip()
    if not tenant:
        raise CliError("--tenant must not be empty", EXIT_USAGE)
    from db import catalog

    async def work(conn: Any) -> tuple[Any, str]:
        record, secret = await catalog.create_api_key(conn, tenant=tenant, name=args.name, scopes=scopes)
        return record, str(secret)

    try:
        record, secret = _run_db(args, work)
    except ValueError as exc:  # the catalog's own validation (tenant, name)
        raise CliError(str(exc), EXIT_USAGE) from None
    _err(
        f"created key {_field(record, 'id')} for tenant {tenant} (scopes: {', '.join(scopes)}).\n"
        "The secret below is shown once and stored only as a hash; keep it now:"
    )
    _out(secret)
    return 0


def cmd_keys_ls(args: argparse.Namespace) -> int:
    from db import catalog

    async def work(conn: Any) -> Any:
        return await catalog.list_api_keys(conn, tenant=args.tenant)

    records = list(_run_db(args, work))
    if args.json:
        _json(
            [
                {k: _field(r, k) for k in ("id", "tenant", "name", "scopes", "created_at", "revoked_at")}
                for r in records
            ]
        )
        return 0
    if not records:
        _out("no keys")
        return 0
    rows = [
        [
            _field(r, "id"),
            _field(r, "tenant"),
            _field(r, "name") or "-",
            ",".join(_field(r, "scopes") or []),
            _when(_field(r, "created_at")),
            _when(_field(r, "revoked_at")) if _field(r, "revoked_at") else "active",
        ]
        for r in records
    ]
    _out(table(["ID", "TENANT", "NAME", "SCOPES", "CREATED", "REVOKED"], rows))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from db import catalog

    async def work(conn: Any) -> bool:
        return bool(await catalog.revoke_api_key(conn, uuid.UUID(args.id)))

    if not _run_db(args, work):
        raise CliError(f"no active key {args.id}")
    _out(f"revoked {args.id}")
    return 0


# -- the parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # --url/--key are accepted before or after the command; SUPPRESS keeps a later default from
    # overwriting an earlier value.
    http = _Parser(add_help=False)
    conn = http.add_argument_group("server")
    conn.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the vramq server (env VRAMQ_URL, default {DEFAULT_URL})",
    )
    conn.add_argument(
        "--key", default=argparse.SUPPRESS, help="API key sent as a bearer token (env VRAMQ_KEY)"
    )

    parser = _Parser(
        prog="vramq",
        description="GPU job scheduler for model inference on PostgreSQL.",
        parents=[http],
        epilog="Settings come from VRAMQ_* environment variables (see docs/deployment.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func: Callable[[argparse.Namespace], int], **kw: Any) -> _Parser:
        p: _Parser = sub.add_parser(name, help=help_text, description=help_text, **kw)
        p.set_defaults(func=func)
        return p

    levels = ["critical", "error", "warning", "info", "debug"]

    p = add(
        "serve",
        "run the HTTP API (and a scheduler candidate unless VRAMQ_ENABLE_SCHEDULER=false)",
        cmd_serve,
    )
    p.add_argument("--host", help="interface to bind (default VRAMQ_HOST or 127.0.0.1)")
    p.add_argument("--port", type=_port, help="TCP port (default VRAMQ_PORT or 8000)")
    p.add_argument("--workers", type=_positive_int, default=1, help="uvicorn worker processes (default 1)")
    p.add_argument(
        "--migrate",
        action="store_true",
        help="migrate an external database (VRAMQ_DATABASE_URL) before serving; the embedded one always is",
    )
    p.add_argument("--log-level", choices=levels, default="info")

    p = add(
        "scheduler",
        "run a scheduler candidate without HTTP (one leader per pool is elected)",
        cmd_scheduler,
    )
    p.add_argument("--migrate", action="store_true", help="migrate an external database first")
    p.add_argument("--log-level", choices=levels, default="info")

    p = add("migrate", "bring the database schema up to date", cmd_migrate)
    p.add_argument("--revision", default="head", help="target revision (default head)")

    p = add("db", "the database: print its URL, stop the embedded server", cmd_db_url)
    db_sub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    q = db_sub.add_parser(
        "url",
        help="print the database URL (starts the embedded server when no VRAMQ_DATABASE_URL is set)",
    )
    q.add_argument("--show-password", action="store_true", help="print the password of an external URL")
    q.set_defaults(func=cmd_db_url)
    q = db_sub.add_parser("stop", help="stop the embedded PostgreSQL server")
    q.set_defaults(func=cmd_db_stop)

    p = add(
        "submit",
        "submit a job, optionally wait for it and download its outputs",
        cmd_submit,
        parents=[http],
    )
    p.add_argument("model", metavar="MODEL", help="model id, e.g. mesh.smooth (see GET /api/v1/models)")
    p.add_argument(
        "-i",
        "--input",
        action="append",
        metavar="KEY=VALUE",
        help='an input; VALUE is JSON when it parses (3, true, {"a": 1}), else text. Repeatable',
    )
    p.add_argument(
        "-f",
        "--file",
        action="append",
        metavar="KEY=@PATH",
        help="upload a local file and pass it as input KEY. Repeatable",
    )
    p.add_argument("--priority", type=int, help="higher runs first (default 0)")
    p.add_argument("--pool", help="run only on this GPU pool (default: any pool serving the model)")
    p.add_argument("--max-attempts", type=_positive_int, help="attempts before the job fails for good")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="per-attempt time limit")
    p.add_argument("--idempotency-key", help="submitting the same key again returns the first job")
    p.add_argument(
        "-w", "--wait", action="store_true", help="show progress until the job ends, then download outputs"
    )
    p.add_argument("-o", "--output-dir", help="where --wait puts the outputs (default ./<job id>/)")
    p.add_argument("--json", action="store_true", help="print the job as JSON")

    p = add("jobs", "list, show and cancel jobs", cmd_jobs_ls, parents=[http])
    jobs_sub = p.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    q = jobs_sub.add_parser("ls", help="list jobs, newest first", parents=[http])
    q.add_argument("--status", choices=STATUSES)
    q.add_argument("--model")
    q.add_argument("--limit", type=_positive_int, default=50, help="at most this many (default 50)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_jobs_ls)
    q = jobs_sub.add_parser("show", help="one job in full", parents=[http])
    q.add_argument("id", metavar="ID", type=_uuid_arg)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_jobs_show)
    q = jobs_sub.add_parser("cancel", help="cancel a job (a running one is stopped)", parents=[http])
    q.add_argument("id", metavar="ID", type=_uuid_arg)
    q.set_defaults(func=cmd_jobs_cancel)

    p = add("status", "leaders, GPUs, workers and queue depth", cmd_status, parents=[http])
    p.add_argument("--json", action="store_true")

    p = add("keys", "API keys (works on the database directly, no server needed)", cmd_keys_ls)
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    q = keys_sub.add_parser("create", help="create a key; its secret is printed once, on the last line")
    q.add_argument("--tenant", required=True, help="the tenant whose jobs and files the key reaches")
    q.add_argument("--scopes", required=True, help=f"comma-separated, from {','.join(SCOPES)}")
    q.add_argument("--name", default="", help="a label for people")
    q.set_defaults(func=cmd_keys_create)
    q = keys_sub.add_parser("ls", help="list keys (secrets are never shown)")
    q.add_argument("--tenant")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_keys_ls)
    q = keys_sub.add_parser("revoke", help="revoke a key at once")
    q.add_argument("id", metavar="ID", type=_uuid_arg)
    q.set_defaults(func=cmd_keys_revoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from core.types import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        _err(f"vramq: error: {exc.message}")
        return exc.code
    except ClientError as exc:
        _err(f"vramq: error: {exc.message}")
        return EXIT_FAILED
    except ConfigError as exc:
        _err(f"vramq: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
