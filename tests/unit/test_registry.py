"""The model registry: the bundled file loads, x-file inputs expand, and bad registries say what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.registry import ModelSpec, Registry
from core.types import DEFAULT_RETRY_ON, ConfigError, ErrorKind, InputError


def model(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "toy.echo",
        "feature": "toy",
        "adapter": "workers.adapters.demo:SleepAdapter",
        "vram_mb": 100,
    }
    raw.update(overrides)
    return raw


def registry(*models: dict[str, Any]) -> Registry:
    return Registry.from_mapping({"models": list(models)}, "test.yaml")


def config_error(*models: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        registry(*models)
    return str(info.value)


# -- the bundled registry ----------------------------------------------------------------------------


def test_bundled_registry_loads() -> None:
    reg = Registry.load()
    assert {m.id for m in reg} >= {"demo.sleep", "mesh.smooth", "mesh.simplify", "mesh.uv_unwrap"}
    assert len(reg) == len(list(reg))
    assert "demo.sleep" in reg and "nope" not in reg
    assert reg.features >= {"demo", "mesh"}
    assert {m.id for m in reg.by_feature("mesh")} >= {"mesh.smooth", "mesh.simplify", "mesh.uv_unwrap"}
    sleep = reg.get("demo.sleep")
    assert sleep is not None and sleep.adapter == "workers.adapters.demo:SleepAdapter"
    assert sleep.file_inputs == {}
    reg.validate_inputs("demo.sleep", {"seconds": 0.5, "steps": 3})
    public = sleep.public()
    assert public["id"] == "demo.sleep" and "adapter" not in public
    assert public["retry_on"] == sorted(k.value for k in DEFAULT_RETRY_ON)


def test_bundled_file_inputs_expand() -> None:
    reg = Registry.load()
    smooth = reg.get("mesh.smooth")
    assert smooth is not None
    assert smooth.file_inputs == {"mesh": ("obj", "glb", "gltf", "ply", "stl", "off")}
    mesh = smooth.inputs["properties"]["mesh"]
    assert mesh["type"] == "object" and mesh["required"] == ["file"]
    assert mesh["additionalProperties"] is False
    assert mesh["description"] == "the mesh to smooth"
    assert "x-file" not in mesh
    reg.validate_inputs("mesh.smooth", {"mesh": {"file": "abc"}, "iterations": 3})


def test_load_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        """
models:
  - id: toy.mesh
    adapter: my_pkg.adapters:Mesh
    vram_mb: 10
    inputs:
      type: object
      properties:
        a: {x-file: true}
        b: {x-file: {extensions: [".OBJ", glb]}}
        c: {type: string}
"""
    )
    reg = Registry.load(path)
    spec = reg.get("toy.mesh")
    assert spec is not None
    assert spec.feature == "toy"  # the id's first part by default
    assert spec.file_inputs == {"a": (), "b": ("obj", "glb")}
    assert spec.inputs["properties"]["c"] == {"type": "string"}
    assert spec.inputs["properties"]["a"]["properties"]["file"]["type"] == "string"


# -- input validation carries a JSON path ------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "inputs", "path"),
    [
        ("demo.sleep", {"seconds": -1}, "inputs.seconds"),
        ("demo.sleep", {"seconds": 1, "steps": "many"}, "inputs.steps"),
        ("demo.sleep", {}, "inputs"),
        ("demo.sleep", {"seconds": 1, "extra": True}, "inputs"),
        ("mesh.smooth", {"mesh": {"file": 3}}, "inputs.mesh.file"),
        ("mesh.smooth", {"mesh": "/etc/passwd"}, "inputs.mesh"),
        ("mesh.smooth", {"mesh": {"file": "a", "path": "/etc/passwd"}}, "inputs.mesh"),
        ("mesh.simplify", {"mesh": {"file": "a"}, "target_faces": 2}, "inputs.target_faces"),
    ],
)
def test_input_errors_carry_a_json_path(model_id: str, inputs: Any, path: str) -> None:
    reg = Registry.load()
    with pytest.raises(InputError) as info:
        reg.validate_inputs(model_id, inputs)
    assert info.value.path == path
    assert str(info.value).startswith(path + ": ")


def test_array_items_are_indexed() -> None:
    reg = registry(
        model(
            inputs={"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}}}}
        )
    )
    with pytest.raises(InputError) as info:
        reg.validate_inputs("toy.echo", {"xs": [1, 2, "three"]})
    assert info.value.path == "inputs.xs[2]"


# -- bad registries ----------------------------------------------------------------------------------


def test_unknown_keys() -> None:
    msg = config_error(model(vram_gb=4))
    assert "test.yaml: models[0]" in msg and "vram_gb" in msg and "unknown" in msg


@pytest.mark.parametrize("adapter", ["no_colon", "mod:", ":Cls", "a b:C", "mod:Cls:extra", 42, None])
def test_bad_adapter_string(adapter: Any) -> None:
    msg = config_error(model(adapter=adapter))
    assert "toy.echo" in msg and "module:Class" in msg


def test_bad_ids() -> None:
    assert "id must match" in config_error(model(id="Has Spaces"))
    assert "id must match" in config_error(model(id=None))
    assert "feature must match" in config_error(model(feature="Bad Feature"))


def test_duplicate_ids() -> None:
    msg = config_error(model(), model(vram_mb=5))
    assert "toy.echo" in msg and "twice" in msg


def test_invalid_inputs_schema() -> None:
    msg = config_error(model(inputs={"type": 12}))
    assert "toy.echo" in msg and "not a valid JSON schema" in msg
    assert "inputs must be a JSON schema object" in config_error(model(inputs=["a"]))


@pytest.mark.parametrize("retry_on", [["nope"], "model_error", [["oom"]], 5])
def test_bad_retry_on(retry_on: Any) -> None:
    msg = config_error(model(retry_on=retry_on))
    assert "toy.echo" in msg and "retry_on" in msg and "model_error" in msg


@pytest.mark.parametrize(
    "bad",
    [{"vram_mb": -1}, {"max_workers": 0}, {"timeout_s": 0}, {"idle_evict_s": -5}, {"max_attempts": 0}],
)
def test_out_of_range_numbers(bad: dict[str, Any]) -> None:
    assert "toy.echo" in config_error(model(**bad))


def test_not_a_number() -> None:
    msg = config_error(model(vram_mb="lots"))
    assert "toy.echo" in msg


def test_document_shape() -> None:
    docs: list[Any] = [None, [], {"models": {}}, {"model": []}]
    for doc in docs:
        with pytest.raises(ConfigError, match="expected a mapping with a 'models' list"):
            Registry.from_mapping(doc, "x.yaml")
    with pytest.raises(ConfigError, match="each model must be a mapping"):
        Registry.from_mapping({"models": ["demo.sleep"]}, "x.yaml")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read model registry"):
        Registry.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [ {id: a\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        Registry.load(broken)
    assert str(broken) in str(info.value)


# -- retry policy ------------------------------------------------------------------------------------


def test_default_retries() -> None:
    spec = registry(model()).get("toy.echo")
    assert spec is not None
    assert spec.retry_on == DEFAULT_RETRY_ON
    assert spec.retries("model_error") and spec.retries(ErrorKind.WORKER_CRASHED)
    assert spec.retries("oom") and spec.retries("lease_lost")
    assert not spec.retries("timeout")
    assert not spec.retries("invalid_input") and not spec.retries("cancelled")
    assert not spec.retries("no_such_kind")


def test_retry_on_never_overrides_never_retry() -> None:
    spec = registry(model(retry_on=["invalid_input", "cancelled", "timeout"])).get("toy.echo")
    assert spec is not None
    assert spec.retries("timeout")
    assert not spec.retries("invalid_input") and not spec.retries(ErrorKind.CANCELLED)
    assert not spec.retries("model_error")  # not listed for this model


def test_empty_retry_on_never_retries() -> None:
    spec = ModelSpec(id="x", feature="x", adapter="a:B", vram_mb=0, retry_on=frozenset())
    assert not any(spec.retries(k) for k in ErrorKind)
