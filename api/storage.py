"""File storage under ``settings.files_dir``: streamed uploads and downloads through database rows.

Uploads are parsed as they arrive (a push parser over the request stream, never a spooled form): the
file part goes to a temporary file next to its final place while its sha256 is computed, and the upload
is refused with 413 as soon as it passes the size limit, the partial file deleted. A complete upload is
renamed atomically to ``<files_dir>/uploads/<tenant hash>/<file id>``. Clients never name a path:
downloads resolve a file row the caller may see.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

FORM_FIELD = "file"
MAX_NAME_CHARS = 200
_MAX_OTHER_FIELDS_BYTES = 64 * 1024  # form fields besides the file are ignored, but still bounded
_SNIFF_BYTES = 512

# Leading bytes of formats worth recognising; text formats (OBJ, ASCII STL/PLY) go by extension.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"glTF", "model/gltf-binary"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b", "application/gzip"),
    (b"ply\n", "application/x-ply"),
    (b"ply\r\n", "application/x-ply"),
)
_EXTENSIONS = {
    "obj": "model/obj",
    "glb": "model/gltf-binary",
    "gltf": "model/gltf+json",
    "ply": "application/x-ply",
    "stl": "model/stl",
    "off": "application/x-off",
    "json": "application/json",
    "txt": "text/plain",
    "npy": "application/octet-stream",
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "exr": "image/x-exr",
}
_DEFAULT_TYPE = "application/octet-stream"


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, "too_large", f"the upload exceeds the limit of {limit} bytes", details={"limit": limit}
    )


def sanitize_name(raw: str | None) -> str:
    """A safe display name: the basename only, printable characters, at most 200 characters."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    if name in {"", ".", ".."}:
        return "upload"
    if len(name) > MAX_NAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        if dot and stem and 0 < len(ext) <= 16:
            name = stem[: MAX_NAME_CHARS - len(ext) - 1] + "." + ext
        else:
            name = name[:MAX_NAME_CHARS]
    return name


def extension(name: str) -> str:
    _, dot, ext = name.rpartition(".")
    return ext.lower() if dot else ""


def sniff_content_type(head: bytes, name: str) -> str:
    """From the leading bytes when they are telling, else from the extension."""
    for magic, ctype in _MAGIC:
        if head.startswith(magic):
            return ctype
    ext = extension(name)
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    guessed, _ = mimetypes.guess_type("x." + ext) if ext else (None, None)
    return guessed or _DEFAULT_TYPE


@dataclass(frozen=True)
class StoredFile:
    id: uuid.UUID
    name: str
    size: int
    sha256: str
    content_type: str
    path: Path


@dataclass
class _Part:
    """The multipart parser's view of the part being read."""

    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    headers: dict[str, str] = field(default_factory=dict)


class _UploadWriter:
    """Writes the file part to a temporary file while hashing it (blocking calls run in a thread)."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.tmp_path = directory / f".part-{secrets.token_hex(8)}"
        self.fh: IO[bytes] | None = None
        self.hasher = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.pending: list[bytes] = []

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.tmp_path, "xb")  # noqa: SIM115 - closed in finish()/discard()

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if len(self.head) < _SNIFF_BYTES:
            self.head += data[: _SNIFF_BYTES - len(self.head)]
        if self.size <= self.limit:
            self.pending.append(data)

    def flush(self) -> None:
        if not self.pending:
            return
        assert self.fh is not None
        data = b"".join(self.pending)
        self.pending.clear()
        self.fh.write(data)
        self.hasher.update(data)

    def finish(self, final: Path) -> None:
        self.flush()
        assert self.fh is not None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        os.replace(self.tmp_path, final)

    def discard(self) -> None:
        if self.fh is not None:
            with contextlib.suppress(OSError):
                self.fh.close()
            self.fh = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()


class Storage:
    def __init__(self, root: Path, *, max_upload_bytes: int) -> None:
        self.root = Path(root).expanduser().resolve()
        self.max_upload_bytes = max_upload_bytes

    def tenant_dir(self, tenant: str) -> Path:
        # Hashed: a tenant name never becomes a path component.
        return self.root / "uploads" / hashlib.sha256(tenant.encode()).hexdigest()[:24]

    def resolve(self, stored_path: str) -> Path | None:
        """The readable regular file a row points at (relative rows are under the storage root)."""
        p = Path(stored_path)
        if not p.is_absolute():
            p = self.root / p
        try:
            if p.is_symlink() or not p.is_file():
                return None
        except OSError:
            return None
        return p

    async def receive(
        self,
        stream: AsyncIterator[bytes],
        *,
        content_type: str | None,
        content_length: int | None,
        tenant: str,
    ) -> StoredFile:
        """Parse a ``multipart/form-data`` upload from ``stream``; store its ``file`` part."""
        ctype, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise ApiError(
                415, "unsupported_media_type", "upload with multipart/form-data and a 'file' field"
            )
        limit = self.max_upload_bytes
        total_limit = limit + _MAX_OTHER_FIELDS_BYTES
        if content_length is not None and content_length > total_limit:
            raise too_large(limit)

        writer = _UploadWriter(self.tenant_dir(tenant), limit)
        part = _Part()
        state: dict[str, Any] = {"target": None, "seen_file": False, "name": None, "done": False}
        other_bytes = 0

        def on_part_begin() -> None:
            nonlocal part
            part = _Part()
            state["target"] = None

        def on_header_field(data: bytes, start: int, end: int) -> None:
            part.header_field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            part.header_value += data[start:end]

        def on_header_end() -> None:
            # latin-1 round-trips any byte; names are decoded (UTF-8 first) once parsed out.
            name = part.header_field.decode("latin-1").strip().lower()
            part.headers[name] = part.header_value.decode("latin-1")
            part.header_field.clear()
            part.header_value.clear()

        def on_headers_finished() -> None:
            _, opts = parse_options_header(part.headers.get("content-disposition", ""))
            field_name = _decode(opts.get(b"name", b""))
            if field_name == FORM_FIELD and not state["seen_file"]:
                state["seen_file"] = True
                state["target"] = writer
                state["name"] = sanitize_name(_decode(opts.get(b"filename", b"")))

        def on_part_data(data: bytes, start: int, end: int) -> None:
            nonlocal other_bytes
            if state["target"] is not None:
                writer.add(data[start:end])
            else:
                other_bytes += end - start

        def on_part_end() -> None:
            state["target"] = None

        def on_end() -> None:
            state["done"] = True

        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished,
                "on_end": on_end,
            },
        )
        received = 0
        try:
            await asyncio.to_thread(writer.open)
            async for chunk in stream:
                received += len(chunk)
                if received > total_limit:
                    raise too_large(limit)
                try:
                    parser.write(chunk)
                except (MultipartParseError, ValueError) as exc:
                    raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc}") from None
                if writer.size > limit or other_bytes > _MAX_OTHER_FIELDS_BYTES:
                    raise too_large(limit)
                if writer.pending:
                    await asyncio.to_thread(writer.flush)
                if state["done"]:
                    break
            if not state["seen_file"]:
                raise ApiError(
                    422, "missing_file", "the upload has no 'file' field", details={"path": "file"}
                )
            if not state["done"]:
                raise ApiError(400, "invalid_multipart", "the multipart body ended early")
            file_id = uuid.uuid4()
            final = writer.directory / str(file_id)
            await asyncio.to_thread(writer.finish, final)
        except BaseException:
            writer.discard()  # an unlink: quick, and it must happen even when we are cancelled
            raise
        name = state["name"] or "upload"
        return StoredFile(
            id=file_id,
            name=name,
            size=writer.size,
            sha256=writer.hasher.hexdigest(),
            content_type=sniff_content_type(writer.head, name),
            path=final,
        )

    async def remove(self, path: Path) -> None:
        def _rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

        await asyncio.to_thread(_rm)


def _decode(raw: bytes | bytearray) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw).decode("latin-1")
