"""The model catalog (api/core/catalog.py, GET /v1/models): facts read without torch, checked
here against torch where a model can be built, and the routes' shapes and refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.core import catalog
from api.core.config import Settings


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {"num_key_value_heads": 4},
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "attention_bias": False},
    ],
    ids=["tiny", "tied", "biases", "mha", "qwen2"],
)
def test_parameter_estimate_equals_torchs_count(tiny_teacher_path: Path, overrides: dict) -> None:
    """Exactly sum(p.numel()) of the model transformers builds from the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {**catalog.read_config(tiny_teacher_path), **overrides}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert catalog.estimate_parameters(config) == sum(p.numel() for p in model.parameters())


def test_the_tiny_presets_facts(tiny_teacher, tiny_teacher_path: Path) -> None:
    facts = catalog.describe(tiny_teacher_path, "preset:tiny", "preset")
    assert facts.parameters == sum(p.numel() for p in tiny_teacher.parameters()) == 246_336
    assert (facts.architecture, facts.num_layers, facts.vocab_size) == ("LlamaForCausalLM", 4, 768)
    assert facts.roles == ["teacher", "student"] and facts.tokenizer_digest is not None


def test_the_catalog_never_imports_torch() -> None:
    code = (
        "import sys, tempfile, pathlib\n"
        "from api.core import catalog\n"
        "from api.routes import models\n"
        "catalog.local_models(pathlib.Path(tempfile.mkdtemp()))\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tokenizer_digest_follows_the_vocabulary(tmp_path: Path, tiny_teacher_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_teacher_path, a)
    shutil.copytree(tiny_teacher_path, b)
    assert catalog.tokenizer_digest(a) == catalog.tokenizer_digest(b)
    tok = json.loads((b / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<extra>"] = 10_000
    (b / "tokenizer.json").write_text(json.dumps(tok))
    assert catalog.tokenizer_digest(a) != catalog.tokenizer_digest(b)
    (b / "tokenizer.json").unlink()
    assert catalog.tokenizer_digest(b) is None and catalog.describe(b, "b", "local").roles == ["student"]


def test_models_lists_presets_the_models_root_and_skips_hidden(
    client: TestClient, headers: dict[str, str], settings: Settings
) -> None:
    (settings.models_root / "org" / "deep").mkdir(parents=True)
    (settings.models_root / "org" / "deep" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3, "vocab_size": 10})
    )
    (settings.models_root / ".distilled" / "job-x").mkdir(parents=True)
    (settings.models_root / ".distilled" / "job-x" / "config.json").write_text("{}")
    (settings.models_root / "broken").mkdir()
    (settings.models_root / "broken" / "config.json").write_text("{nope")
    listed = client.get("/v1/models", headers=headers).json()
    ids = [m["id"] for m in listed["data"]]
    assert ids == ["preset:tiny", "preset:smollm2-135m-instruct", "my-student", "org/deep"]
    tiny = listed["data"][0]
    assert (tiny["prepared"], tiny["num_layers"], tiny["parameters"], tiny["owned_by"]) == (
        False,
        4,
        None,
        "system",
    )
    deep = client.get("/v1/models/org/deep", headers=headers).json()
    assert (deep["object"], deep["num_layers"], deep["vocab_size"], deep["source"]) == (
        "model",
        3,
        10,
        "local",
    )
    assert deep["parameters"] is None  # not enough in the config to count


@pytest.mark.parametrize("ref", ["nope", ".distilled/job-x", "broken", "preset:nope", "ft:job-123", "../etc"])
def test_unknown_models_are_404(
    ref: str, client: TestClient, headers: dict[str, str], settings: Settings
) -> None:
    (settings.models_root / ".distilled" / "job-x").mkdir(parents=True)
    (settings.models_root / ".distilled" / "job-x" / "config.json").write_text("{}")
    (settings.models_root / "broken").mkdir()
    response = client.get(f"/v1/models/{ref}", headers=headers)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["type"] == "not_found_error"


def test_a_hidden_folder_is_no_teachers_reference(
    client: TestClient, headers: dict[str, str], settings: Settings
) -> None:
    """.distilled/ holds copies of tenants' distilled models: only ft: ids reach them."""
    shutil.copytree(settings.models_root / "my-student", settings.models_root / ".distilled" / "job-x")
    body = {"teacher": ".distilled/job-x", "data": {"train": "demo:train"}, "resources": {"device": "cpu"}}
    response = client.post("/v1/jobs", headers=headers, json=body)
    assert response.status_code == 404 and response.json()["error"]["param"] == "teacher"


def test_a_name_longer_than_the_file_system_takes_is_404(client: TestClient, headers: dict[str, str]) -> None:
    body = {"teacher": "a" * 300, "data": {"train": "demo:train"}, "resources": {"device": "cpu"}}
    response = client.post("/v1/jobs", headers=headers, json=body)
    assert response.status_code == 404 and response.json()["error"]["param"] == "teacher"
    assert client.get(f"/v1/models/{'a' * 300}", headers=headers).status_code == 404
