"""The model registry: which models exist, what they need, and what inputs they accept.

``models.yaml`` lists models; each entry names its adapter as ``module:Class`` (imported only inside GPU
worker subprocesses, never here). Inputs are a JSON schema checked at submit time. A property written as
``{x-file: true}`` (or ``{x-file: {extensions: [obj, glb]}}``) is an uploaded file, sent as
``{"file": "<id>"}``: vramq resolves it to the caller's own upload and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from core.types import DEFAULT_RETRY_ON, NEVER_RETRY, ConfigError, ErrorKind, InputError

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,99}$")
_ADAPTER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
FILE_KEY = "x-file"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    feature: str
    adapter: str
    vram_mb: int
    max_workers: int = 1
    timeout_s: float = 600.0
    idle_evict_s: float = 600.0
    max_attempts: int = 3
    retry_on: frozenset[ErrorKind] = DEFAULT_RETRY_ON
    inputs: Mapping[str, Any] = field(default_factory=dict)
    file_inputs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""

    def retries(self, kind: ErrorKind | str) -> bool:
        try:
            k = ErrorKind(kind)
        except ValueError:
            return False
        return k in self.retry_on and k not in NEVER_RETRY

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "feature": self.feature,
            "vram_mb": self.vram_mb,
            "max_workers": self.max_workers,
            "timeout_s": self.timeout_s,
            "idle_evict_s": self.idle_evict_s,
            "max_attempts": self.max_attempts,
            "retry_on": sorted(k.value for k in self.retry_on),
            "inputs": dict(self.inputs),
            "description": self.description,
        }


def _file_schema(spec: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"file": {"type": "string", "minLength": 1, "maxLength": 64}},
        "required": ["file"],
        "additionalProperties": False,
    }


def _expand(schema: dict[str, Any], model_id: str) -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    """Replace top-level ``x-file`` properties by the ``{"file": id}`` object schema."""
    files: dict[str, tuple[str, ...]] = {}
    props = dict(schema.get("properties", {}))
    for name, prop in props.items():
        if isinstance(prop, dict) and FILE_KEY in prop:
            marker = prop[FILE_KEY]
            exts: tuple[str, ...] = ()
            if isinstance(marker, dict):
                exts = tuple(str(e).lower().lstrip(".") for e in marker.get("extensions", ()))
            files[name] = exts
            expanded = _file_schema(marker)
            if "description" in prop:
                expanded["description"] = prop["description"]
            props[name] = expanded
    out = dict(schema)
    if props:
        out["properties"] = props
    out.setdefault("type", "object")
    try:
        jsonschema.Draft202012Validator.check_schema(out)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"model {model_id}: inputs is not a valid JSON schema: {exc.message}") from None
    return out, files


def _spec(raw: Mapping[str, Any], where: str) -> ModelSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: each model must be a mapping")
    known = {
        "id",
        "feature",
        "adapter",
        "vram_mb",
        "max_workers",
        "timeout_s",
        "idle_evict_s",
        "max_attempts",
        "retry_on",
        "inputs",
        "description",
    }
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    mid = raw.get("id")
    if not isinstance(mid, str) or not _ID_RE.match(mid):
        raise ConfigError(f"{where}: id must match {_ID_RE.pattern}, got {mid!r}")
    adapter = raw.get("adapter")
    if not isinstance(adapter, str) or not _ADAPTER_RE.match(adapter):
        raise ConfigError(f"model {mid}: adapter must be 'module:Class', got {adapter!r}")
    feature = raw.get("feature", mid.split(".")[0])
    if not isinstance(feature, str) or not _ID_RE.match(feature):
        raise ConfigError(f"model {mid}: feature must match {_ID_RE.pattern}")
    try:
        vram_mb = int(raw.get("vram_mb", 0))
        max_workers = int(raw.get("max_workers", 1))
        timeout_s = float(raw.get("timeout_s", 600))
        idle_evict_s = float(raw.get("idle_evict_s", 600))
        max_attempts = int(raw.get("max_attempts", 3))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {mid}: {exc}") from None
    if vram_mb < 0 or max_workers < 1 or timeout_s <= 0 or idle_evict_s <= 0 or max_attempts < 1:
        raise ConfigError(
            f"model {mid}: need vram_mb >= 0, max_workers >= 1, timeout_s > 0, idle_evict_s > 0, "
            "max_attempts >= 1"
        )
    retry_raw = raw.get("retry_on")
    if retry_raw is None:
        retry_on = DEFAULT_RETRY_ON
    else:
        try:
            retry_on = frozenset(ErrorKind(k) for k in retry_raw)
        except (TypeError, ValueError):
            raise ConfigError(
                f"model {mid}: retry_on must list error kinds from {[k.value for k in ErrorKind]}"
            ) from None
    inputs_raw = raw.get("inputs") or {"type": "object"}
    if not isinstance(inputs_raw, dict):
        raise ConfigError(f"model {mid}: inputs must be a JSON schema object")
    inputs, files = _expand(inputs_raw, mid)
    return ModelSpec(
        id=mid,
        feature=feature,
        adapter=adapter,
        vram_mb=vram_mb,
        max_workers=max_workers,
        timeout_s=timeout_s,
        idle_evict_s=idle_evict_s,
        max_attempts=max_attempts,
        retry_on=retry_on,
        inputs=inputs,
        file_inputs=files,
        description=str(raw.get("description", "")),
    )


class Registry:
    """An immutable set of models, looked up by id or feature."""

    def __init__(self, models: Iterable[ModelSpec]) -> None:
        self._models: dict[str, ModelSpec] = {}
        for m in models:
            if m.id in self._models:
                raise ConfigError(f"model {m.id} is listed twice")
            self._models[m.id] = m
        self._validators = {
            m.id: jsonschema.Draft202012Validator(dict(m.inputs)) for m in self._models.values()
        }

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def __iter__(self) -> Any:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, model_id: str) -> ModelSpec | None:
        return self._models.get(model_id)

    def by_feature(self, feature: str) -> list[ModelSpec]:
        return [m for m in self._models.values() if m.feature == feature]

    @property
    def features(self) -> set[str]:
        return {m.feature for m in self._models.values()}

    def validate_inputs(self, model_id: str, inputs: Any) -> None:
        """Raise InputError (with a JSON path to the offending field) unless inputs fit the schema."""
        validator = self._validators[model_id]
        errors = sorted(validator.iter_errors(inputs), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            path = "inputs" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
            raise InputError(f"{path}: {err.message}", path=path)

    @classmethod
    def from_mapping(cls, doc: Any, where: str = "models.yaml") -> Registry:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("models"), list):
            raise ConfigError(f"{where}: expected a mapping with a 'models' list")
        return cls(_spec(m, f"{where}: models[{i}]") for i, m in enumerate(doc["models"]))

    @classmethod
    def load(cls, path: Path | None = None) -> Registry:
        """Load a registry file; None loads the bundled ``core/models.yaml``."""
        if path is None:
            text = resources.files("core").joinpath("models.yaml").read_text()
            where = "core/models.yaml"
        else:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read model registry {path}: {exc.strerror}") from None
            where = str(path)
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: invalid YAML: {exc}") from None
        return cls.from_mapping(doc, where)
