"""Model references, presets, teacher loading, student construction, tokenizer checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from akl_core import models, students
from akl_core.models import ModelError, resolve_model_ref
from akl_core.spec import StudentSpec

# -- environment defaults -----------------------------------------------------------------------


def test_default_models_root_env_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AKL_MODELS_ROOT", raising=False)
    monkeypatch.delenv("AKL_DATA_ROOT", raising=False)
    assert models.default_models_root() == Path(".akl") / "models"
    monkeypatch.setenv("AKL_DATA_ROOT", str(tmp_path / "data"))
    assert models.default_models_root() == tmp_path / "data" / "models"
    monkeypatch.setenv("AKL_MODELS_ROOT", str(tmp_path / "m"))
    assert models.default_models_root() == tmp_path / "m"


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("", False)]
)
def test_hub_allowed(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("AKL_ALLOW_HUB", value)
    assert models.hub_allowed() is expected


# -- reference resolution -----------------------------------------------------------------------


def test_preset_tiny_resolves_to_prepared_dir(models_root: Path) -> None:
    path = resolve_model_ref("preset:tiny", models_root)
    assert path == models_root / "tiny"
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not list(models_root.glob(".tmp-*")), "the atomic build left a temp directory behind"


def test_relative_dir_under_root(models_root: Path, tiny_student_path: Path) -> None:
    assert resolve_model_ref("tiny-student", models_root) == tiny_student_path.resolve()


@pytest.mark.parametrize("ref", ["../tiny", "a/../../etc", "/etc", "tiny/../.."])
def test_traversal_refused(models_root: Path, ref: str) -> None:
    with pytest.raises(ModelError) as err:
        resolve_model_ref(ref, models_root)
    assert err.value.code == "invalid_model"
    assert ref in str(err.value)


@pytest.mark.parametrize("ref", [".", "./", "./.", ".//"])
def test_the_root_itself_is_refused(models_root: Path, ref: str) -> None:
    with pytest.raises(ModelError, match="names the models root itself") as err:
        resolve_model_ref(ref, models_root)
    assert err.value.code == "invalid_model"


def test_preset_layer_counts_match_what_is_built(tiny_teacher_path: Path) -> None:
    """The API checks student.num_layers against PRESET_LAYERS before a preset is built."""
    config = json.loads((tiny_teacher_path / "config.json").read_text())
    assert config["num_hidden_layers"] == models.PRESET_LAYERS[models.TINY]
    assert models.can_prepare_preset(models.TINY) and not models.can_prepare_preset("gpt-17")


def test_symlink_escaping_root_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    os.symlink(outside, root / "evil")
    with pytest.raises(ModelError, match="outside the models root") as err:
        resolve_model_ref("evil", root)
    assert err.value.code == "invalid_model"


def test_symlink_inside_root_allowed(models_root: Path, tmp_path: Path) -> None:
    link = models_root / "tiny-link"
    if not link.exists():
        os.symlink(models_root / "tiny", link)
    assert resolve_model_ref("tiny-link", models_root) == (models_root / "tiny").resolve()


def test_missing_dir_names_ref_and_root(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        resolve_model_ref("nope/model", tmp_path)
    assert err.value.code == "model_not_found"
    assert "nope/model" in str(err.value) and str(tmp_path) in str(err.value)


def test_dir_without_config_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as err:
        resolve_model_ref("empty", tmp_path)
    assert err.value.code == "invalid_model"


def test_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="known presets") as err:
        resolve_model_ref("preset:gpt-17", tmp_path)
    assert err.value.code == "model_not_found"


def test_hub_refused_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="AKL_ALLOW_HUB") as err:
        resolve_model_ref("hf:org/name", tmp_path, allow_hub=False)
    assert err.value.code == "model_not_found"


def test_hub_allowed_uses_snapshot_download_with_patterns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub

    calls = {}

    def fake_download(repo_id: str, **kwargs: object) -> str:
        calls.update(kwargs, repo_id=repo_id)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_ref("hf:org/name", tmp_path, allow_hub=True) == tmp_path / "snap"
    assert calls["repo_id"] == "org/name"
    assert "*.safetensors" in calls["allow_patterns"] and "*.bin" not in calls["allow_patterns"]


def test_smollm2_missing_package_says_how_to_prepare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(models, "_smollm2_gguf", lambda: None)
    with pytest.raises(ModelError, match="akl models prepare smollm2-135m-instruct") as err:
        resolve_model_ref("preset:smollm2-135m-instruct", tmp_path)
    assert err.value.code == "model_not_found"


def test_resolve_uses_the_given_root(models_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AKL_MODELS_ROOT", "/nonexistent-models-root")
    assert resolve_model_ref("preset:tiny", models_root, allow_hub=False) == models_root / "tiny"


# -- tiny preset ----------------------------------------------------------------------------------


def test_tiny_preset_is_deterministic_and_reloads(tmp_path: Path, tiny_teacher: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    path = models.prepare_preset("tiny", tmp_path)
    assert json.loads((path / models.PRESET_MARKER).read_text()) == {"preset": "tiny"}
    first = load_file(tiny_teacher.name_or_path + "/model.safetensors")
    second = load_file(path / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # The tokenizer is rebuilt identically as well.
    tok_a = models.load_tokenizer(Path(tiny_teacher.name_or_path))
    tok_b = models.load_tokenizer(path)
    assert models.tokenizer_fingerprint(tok_a) == models.tokenizer_fingerprint(tok_b)


def test_prepare_is_idempotent_and_force_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    monkeypatch.setitem(models.__dict__, "_build_tiny", lambda out: (built.append(out), _fake_model(out)))
    path = models.prepare_preset("tiny", tmp_path)
    assert models.prepare_preset("tiny", tmp_path) == path and len(built) == 1
    (path / "stale.txt").write_text("old")
    models.prepare_preset("tiny", tmp_path, force=True)
    assert len(built) == 2 and not (path / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_failed_prepare_leaves_no_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out: Path) -> None:
        _fake_model(out)
        raise RuntimeError("disk full")

    monkeypatch.setitem(models.__dict__, "_build_tiny", crash)
    with pytest.raises(RuntimeError):
        models.prepare_preset("tiny", tmp_path)
    assert list(tmp_path.iterdir()) == []


def _fake_model(out: Path) -> None:
    (out / "config.json").write_text("{}")


def test_tiny_tokenizer_properties(tiny_tokenizer) -> None:
    assert 512 <= len(tiny_tokenizer) <= 1000
    assert tiny_tokenizer.pad_token == "<pad>" and tiny_tokenizer.eos_token == "</s>"
    assert tiny_tokenizer.bos_token == "<s>"
    assert tiny_tokenizer.padding_side == "left"
    text = "Elizabeth walked to Netherfield."
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text
    chat = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nHi</s>\n<|assistant|>\n"


def test_load_tokenizer_falls_back_to_eos_pad(tmp_path: Path, tiny_tokenizer) -> None:
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = models.load_tokenizer(tmp_path, padding_side="right")
    assert loaded.pad_token == "</s>" and loaded.padding_side == "right"


def test_load_teacher_is_frozen(tiny_teacher) -> None:
    assert not tiny_teacher.training
    assert not any(p.requires_grad for p in tiny_teacher.parameters())
    assert next(tiny_teacher.parameters()).dtype == torch.float32
    assert tiny_teacher.config.num_hidden_layers == 4 and not tiny_teacher.config.tie_word_embeddings


def test_load_teacher_dtype(tiny_teacher_path: Path) -> None:
    model = models.load_teacher(tiny_teacher_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_load_teacher_refuses_bin_only_dir(tmp_path: Path, tiny_teacher_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_teacher_path / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded: pickles are refused")
    with pytest.raises(ModelError) as err:
        models.load_teacher(tmp_path)
    assert err.value.code == "invalid_model"


# -- students -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "k", "expected"),
    [(4, 2, [0, 3]), (4, 4, [0, 1, 2, 3]), (30, 6, [0, 6, 12, 17, 23, 29]), (6, 3, [0, 3, 5]), (4, 1, [0])],
)
def test_truncate_layer_indices(total: int, k: int, expected: list[int]) -> None:
    assert students.truncate_layer_indices(total, k) == expected


def test_truncate_copies_the_right_layers(tiny_teacher, tiny_teacher_path: Path) -> None:
    student = students.build_student(StudentSpec(init="truncate", num_layers=3), tiny_teacher_path)
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    t_state, s_state = tiny_teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 3]):  # round(i * 3 / 2), halves up: 0, 1.5 -> 2, 3
        for name, value in student.model.layers[new].state_dict().items():
            assert torch.equal(value, t_state[f"model.layers.{old}.{name}"]), (new, old, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[name], t_state[name])
    # The copy is independent: training the student must not move the frozen teacher.
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)
    assert not torch.equal(student.lm_head.weight, tiny_teacher.lm_head.weight)


def test_truncate_too_many_layers_names_field(tiny_teacher_path: Path) -> None:
    with pytest.raises(ModelError, match="student.num_layers") as err:
        students.build_student(StudentSpec(init="truncate", num_layers=5), tiny_teacher_path)
    assert err.value.code == "invalid_model"


def test_truncated_student_matches_teacher_when_all_layers_kept(
    tiny_teacher, tiny_teacher_path: Path
) -> None:
    student = students.build_student(StudentSpec(init="truncate", num_layers=4), tiny_teacher_path).eval()
    ids = torch.tensor([[5, 40, 200, 31, 7]])
    torch.testing.assert_close(student(ids).logits, tiny_teacher(ids).logits)


def test_config_student_with_overrides_is_seeded(tiny_teacher_path: Path) -> None:
    spec = StudentSpec(
        init="config", num_layers=1, config_overrides={"hidden_size": 32, "intermediate_size": 48}
    )
    a = students.build_student(spec, tiny_teacher_path, seed=3)
    b = students.build_student(spec, tiny_teacher_path, seed=3)
    c = students.build_student(spec, tiny_teacher_path, seed=4)
    assert (a.config.num_hidden_layers, a.config.hidden_size, a.config.intermediate_size) == (1, 32, 48)
    assert a.config.head_dim == 8  # recomputed: 32 / 4 heads
    assert a.config.vocab_size == 768 and a.training
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 768)


def test_config_student_larger_than_the_teacher_is_refused(tiny_teacher_path: Path) -> None:
    with pytest.raises(ModelError, match="at most the teacher's 4 layers") as err:
        students.build_student(StudentSpec(init="config", num_layers=5), tiny_teacher_path)
    assert err.value.code == "invalid_model"


@pytest.mark.parametrize(
    ("override", "match"), [({"hidden_sise": 32}, "hidden_sise"), ({"vocab_size": 10}, "vocab_size")]
)
def test_config_override_errors_name_the_key(tiny_teacher_path: Path, override: dict, match: str) -> None:
    # model_construct skips the spec's own checks (which refuse vocab_size first): this tests the
    # loader's defence in depth, for specs built by other code.
    spec = StudentSpec.model_construct(init="config", num_layers=1, config_overrides=override, model=None)
    with pytest.raises(ModelError, match=f"student.config_overrides.{match}") as err:
        students.build_student(spec, tiny_teacher_path)
    assert err.value.code == "invalid_model"


def test_pretrained_student_loads_ref(tiny_student, tiny_student_path: Path) -> None:
    assert tiny_student.training and tiny_student.config.num_hidden_layers == 2


def test_pretrained_student_missing_ref(models_root: Path, tiny_teacher_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        students.build_student(
            StudentSpec(init="pretrained", model="no-such"), tiny_teacher_path, models_root
        )
    assert err.value.code == "model_not_found"


# -- tokenizer checks -----------------------------------------------------------------------------


def test_check_tokenizers_accepts_same(tiny_tokenizer, tiny_student_path: Path) -> None:
    models.check_tokenizers(tiny_tokenizer, models.load_tokenizer(tiny_student_path))


def test_check_tokenizers_detects_mismatch(tiny_tokenizer) -> None:
    from akl_core.tokenizer_tiny import build_tiny_tokenizer

    other = build_tiny_tokenizer(vocab_size=600)
    with pytest.raises(ModelError, match="differ") as err:
        models.check_tokenizers(tiny_tokenizer, other)
    assert err.value.code == "tokenizer_mismatch"


def test_common_vocab_size_slices_padded_vocab(tiny_teacher, tiny_teacher_path: Path, tiny_tokenizer) -> None:
    padded = students.build_student(
        StudentSpec(init="config", num_layers=1, config_overrides={"hidden_size": 32}), tiny_teacher_path
    )
    padded.resize_token_embeddings(800)  # e.g. padded to a multiple of 32
    assert models.common_vocab_size(tiny_teacher, padded, tiny_tokenizer) == 768
    assert models.common_vocab_size(padded, padded, tiny_tokenizer) == 800


def test_common_vocab_size_refuses_short_vocab(tiny_teacher, tiny_tokenizer, tiny_teacher_path: Path) -> None:
    small = students.build_student(StudentSpec(init="config", num_layers=1), tiny_teacher_path)
    small.resize_token_embeddings(500)
    with pytest.raises(ModelError) as err:
        models.common_vocab_size(tiny_teacher, small, tiny_tokenizer)
    assert err.value.code == "tokenizer_mismatch"


# -- the real teacher -----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_preset_answers_paris(smollm2_path: Path) -> None:
    tok = models.load_tokenizer(smollm2_path)
    model = models.load_teacher(smollm2_path)
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    assert not any(p.requires_grad for p in model.parameters())
    inputs = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_smollm2_perplexity_and_truncated_student(smollm2_path: Path) -> None:
    tok = models.load_tokenizer(smollm2_path)
    model = models.load_teacher(smollm2_path)
    ids = tok(
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.",
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        ppl = torch.exp(model(ids, labels=ids).loss).item()
    assert 1.5 < ppl < 60
    student = students.build_student(StudentSpec(init="truncate", num_layers=6), smollm2_path)
    assert student.config.num_hidden_layers == 6
    assert models.common_vocab_size(model, student, tok) == 49152
    assert torch.equal(
        student.model.layers[5].mlp.down_proj.weight, model.model.layers[29].mlp.down_proj.weight
    )


def test_prepare_keeps_a_concurrent_complete_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def racing_build(out: Path) -> None:  # another process finishes first, while we build
        (tmp_path / "tiny").mkdir()
        (tmp_path / "tiny" / "config.json").write_text('{"theirs": true}')
        (out / "config.json").write_text('{"ours": true}')

    monkeypatch.setitem(models.__dict__, "_build_tiny", racing_build)
    path = models.prepare_preset("tiny", tmp_path)
    assert json.loads((path / "config.json").read_text()) == {"theirs": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_prepared_preset_is_readable_by_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.__dict__, "_build_tiny", _fake_model)
    old = os.umask(0o022)
    try:
        path = models.prepare_preset("tiny", tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert (path / "config.json").stat().st_mode & 0o777 == 0o644


def test_prepare_removes_stale_temp_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.__dict__, "_build_tiny", _fake_model)
    stale, fresh = tmp_path / ".tmp-tiny-dead", tmp_path / ".tmp-tiny-building"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (0, 0))
    models.prepare_preset("tiny", tmp_path)
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("ref", ["hf:justname", "hf:org/../x", "hf:org/na me"])
def test_hub_ref_shape_checked_before_download(tmp_path: Path, ref: str) -> None:
    with pytest.raises(ModelError, match="hf:ORG/NAME") as err:
        resolve_model_ref(ref, tmp_path, allow_hub=True)
    assert err.value.code == "invalid_model"


def test_models_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, akl_core.models; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
