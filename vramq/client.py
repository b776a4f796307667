"""A small synchronous client for vramq's REST API (v1), used by the command line.

Every failure a person can act on becomes a ``ClientError`` with one readable message: the server's
``{"error": {"code", "message"}}`` answer, or "cannot reach vramq at URL" when nothing listens there.
``events`` follows a job's server-sent events and yields each event's JSON ``data``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx

API = "/api/v1"
DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    """A request failed; ``message`` says why in one line, ``status`` is the HTTP status if any."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class Unreachable(ClientError):
    """Nothing answered at the server's address (refused, unknown host, timed out connecting)."""


@dataclass(frozen=True)
class Event:
    """One server-sent event: its name (``message`` when the server gave none) and decoded data."""

    event: str
    data: Any
    id: str | None = None


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Turn the lines of a ``text/event-stream`` body into events (the WHATWG parsing rules, trimmed).

    ``data`` lines of one event are joined with newlines and decoded as JSON when they parse.
    Comment lines (``:``) are keep-alives and ignored.
    """
    name = ""
    data: list[str] = []
    last_id: str | None = None
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield Event(name or "message", value, last_id)
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value_text = line.partition(":")
        if value_text.startswith(" "):
            value_text = value_text[1:]
        if field == "event":
            name = value_text
        elif field == "data":
            data.append(value_text)
        elif field == "id":
            last_id = value_text
    if data:  # a stream that ends without the final blank line still delivers its last event
        text = "\n".join(data)
        try:
            tail: Any = json.loads(text)
        except ValueError:
            tail = text
        yield Event(name or "message", tail, last_id)


def error_message(response: httpx.Response) -> tuple[str, str | None]:
    """The server's error message and code from an error response, whatever its shape."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            code = err.get("code")
            return str(err["message"]), str(code) if code is not None else None
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail, None
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            first = detail[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            return (f"{loc}: {first.get('msg', '')}" if loc else str(first.get("msg", ""))), None
    text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
    return text or response.reason_phrase or f"HTTP {response.status_code}", None


def safe_output_name(name: str) -> str:
    """An output's name as a relative path (``mesh.glb``, ``textures/albedo.png``); anything that could
    leave the output directory (absolute, ``..``, backslashes, empty parts) is refused."""
    parts = name.split("/")
    if not name or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        raise ClientError(f"the server named an output {name!r}, which is not a safe relative file name")
    return str(PurePosixPath(*parts))


class Client:
    """vramq's API at ``url``; ``key`` is sent as a bearer token when given."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        key: str | None = None,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "vramq-cli"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport, follow_redirects=True
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------------

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        return Unreachable(f"cannot reach vramq at {self.url}: is `vramq serve` running? ({exc})")

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            message, code = error_message(response)
            if response.status_code == 401:
                message += " (pass --key or set VRAMQ_KEY)"
            raise ClientError(message, status=response.status_code, code=code)
        return response

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(exc) from None
        except httpx.TransportError as exc:
            raise ClientError(f"request to {self.url}{path} failed: {exc or type(exc).__name__}") from None
        return self._check(response)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"{method} {path}: the server did not answer with JSON") from None

    # -- the API ---------------------------------------------------------------------------------

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /files: upload one local file; returns {id, name, size, sha256}."""
        with path.open("rb") as fh:
            body = self.json("POST", f"{API}/files", files={"file": (path.name, fh)})
        if not isinstance(body, dict) or "id" not in body:
            raise ClientError("POST /files: the answer has no file id")
        return body

    def submit(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        priority: int | None = None,
        pool: str | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": model, "inputs": dict(inputs)}
        if priority is not None:
            payload["priority"] = priority
        if pool is not None:
            payload["pool"] = pool
        if max_attempts is not None:
            payload["max_attempts"] = max_attempts
        if timeout_s is not None:
            payload["timeout_s"] = timeout_s
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        job = self.json("POST", f"{API}/jobs", json=payload, headers=headers)
        if not isinstance(job, dict) or "id" not in job:
            raise ClientError("POST /jobs: the answer has no job id")
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        body = self.json("GET", f"{API}/jobs/{quote(job_id, safe='')}")
        if not isinstance(body, dict):
            raise ClientError("GET /jobs/{id}: unexpected answer")
        return body

    def jobs(self, *, status: str | None = None, model: str | None = None, limit: int | None = None) -> Any:
        wanted = {"status": status, "model": model, "limit": limit}
        params = {k: v for k, v in wanted.items() if v is not None}
        return self.json("GET", f"{API}/jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        body = self.json("POST", f"{API}/jobs/{quote(job_id, safe='')}/cancel")
        return body if isinstance(body, dict) else {"id": job_id}

    def system_status(self) -> dict[str, Any]:
        body = self.json("GET", f"{API}/system/status")
        if not isinstance(body, dict):
            raise ClientError("GET /system/status: unexpected answer")
        return body

    def events(self, job_id: str, *, read_timeout_s: float = 60.0) -> Iterator[Event]:
        """Follow GET /jobs/{id}/events until the server ends the stream.

        Raises ``Unreachable`` when the server cannot be reached and ``ClientError`` when the stream
        breaks; the caller decides whether to reconnect.
        """
        path = f"{API}/jobs/{quote(job_id, safe='')}/events"
        timeout = httpx.Timeout(10.0, read=read_timeout_s)
        try:
            with self._http.stream(
                "GET", path, headers={"Accept": "text/event-stream"}, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                yield from parse_sse(response.iter_lines())
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(exc) from None
        except httpx.TransportError as exc:
            raise ClientError(f"the event stream broke: {exc or type(exc).__name__}") from None

    def download(self, path: str, dest: Path, *, sha256: str | None = None) -> int:
        """Stream a file to ``dest`` (written under a temporary name, then renamed); its size.

        With ``sha256`` the content is checked and a mismatch is an error (nothing is left behind).
        """
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        digest = hashlib.sha256()
        size = 0
        try:
            with self._http.stream("GET", path, timeout=httpx.Timeout(30.0, read=300.0)) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                with tmp.open("wb") as fh:
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            if sha256 and digest.hexdigest() != sha256.lower():
                raise ClientError(f"{dest.name}: the download does not match its sha256; try again")
            tmp.replace(dest)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(exc) from None
        except httpx.TransportError as exc:
            raise ClientError(f"downloading {dest.name} failed: {exc or type(exc).__name__}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return size
