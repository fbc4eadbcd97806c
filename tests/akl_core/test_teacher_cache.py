"""Teacher caches: the format (a float64 reference, exact round trip, random access), integrity
(corrupt / truncated shards), building (resume after SIGKILL, stop, cancel), the checks of a job
against the manifest, and training from a cache (k = V against the online teacher, exact resume).
Tiny preset only, except one slow test on the real 135M teacher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from akl_core import batches, data, models, students
from akl_core.cache_builder import build_cache
from akl_core.cache_data import response_tokens
from akl_core.cache_spec import CacheSpec, job_mismatches, read_manifest, resolve_cache_ref
from akl_core.cached_teacher import truncated_from_files
from akl_core.events import DistillError, read_events
from akl_core.spec import StudentSpec, load_spec
from akl_core.teacher_cache import open_cache, shard_metadata, topk_rows, write_shard
from akl_core.trainer import distill

MAX_LENGTH, MAX_PROMPT = 64, 32


def _write_jsonl(path: Path, source: str, first: int, count: int) -> Path:
    lines = data.resolve_data_path(source).read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[first : first + count]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": _write_jsonl(root / "train.jsonl", "demo:train", 0, 12),
        "other": _write_jsonl(root / "other.jsonl", "demo:train", 100, 12),
        "validation": _write_jsonl(root / "validation.jsonl", "demo:validation", 0, 4),
    }


def cache_spec(files: dict[str, Path], top_k: int = 8, **build) -> CacheSpec:
    return CacheSpec.model_validate(
        {
            "teacher": "preset:tiny",
            "data": {
                "train": str(files["train"]),
                "validation": str(files["validation"]),
                "max_length": MAX_LENGTH,
                "max_prompt_length": MAX_PROMPT,
            },
            "top_k": top_k,
            "evaluation": {"num_examples": 2, "seeds": [1], "max_new_tokens": 4},
            "build": {"shard_examples": 4, "batch_size": 3, **build},
        }
    )


@pytest.fixture(scope="module")
def caches_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("caches")


@pytest.fixture(scope="module")
def built(files, caches_root, models_root) -> Path:
    """A k = 8 cache of 12 training and 4 validation examples, in shards of 4."""
    out = caches_root / "k8"
    result = build_cache(cache_spec(files), out, models_root=models_root)
    assert result["status"] == "completed"
    return out


@pytest.fixture
def caches_env(caches_root, monkeypatch) -> Path:
    monkeypatch.setenv("AKL_CACHES_ROOT", str(caches_root))
    return caches_root


# -- the format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 50])
def test_topk_rows_match_a_float64_reference(k):
    torch.manual_seed(0)
    logits = torch.randn(6, 50, dtype=torch.float64) * 3
    ids, lp, tail = topk_rows(logits.float(), k)
    ref = torch.log_softmax(logits, -1)
    assert ids.shape == (6, k) and lp.dtype == torch.float32 and tail.shape == (6,)
    torch.testing.assert_close(lp.double(), ref.gather(1, ids), rtol=0, atol=1e-5)
    assert bool((ref.gather(1, ids).min(1).values >= ref.topk(k, 1).values[:, -1] - 1e-9).all())  # the top k
    rest = torch.ones_like(ref, dtype=torch.bool).scatter(1, ids, False)
    expected_tail = torch.logsumexp(ref.masked_fill(~rest, float("-inf")), -1)
    torch.testing.assert_close(tail.double(), expected_tail, rtol=0, atol=1e-5)
    if k == 50:  # k = V: nothing is left
        assert bool(torch.isinf(tail).all())


def test_write_shard_round_trips_bit_for_bit(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 65_536, size=(7, 4)).astype(np.uint16)
    lp = (-rng.random((7, 4)) * 20).astype(np.float16)
    tail = np.array([-0.1, -3.0, -np.inf, -1e-4, -8.0, -0.5, -2.0], dtype=np.float32)
    offsets = np.array([0, 3, 3, 7], dtype=np.int64)
    path = tmp_path / "train-00000.safetensors"
    write_shard(path, ids, lp, tail, offsets, {"split": "train"})
    back = load_file(str(path))
    for name, want in (
        ("topk_ids", ids),
        ("topk_logprobs", lp),
        ("tail_logmass", tail),
        ("offsets", offsets),
    ):
        assert back[name].dtype == want.dtype and back[name].tobytes() == want.tobytes(), name
    assert shard_metadata(path) == {"split": "train"}
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was renamed into place


def test_cache_holds_the_teachers_top_k(built, files, tiny_teacher, tiny_tokenizer):
    """Every stored row against the teacher's own full forward, one example at a time, in float64."""
    cache = open_cache(built)
    m = cache.manifest
    assert (m.top_k, m.vocab_size, m.id_dtype, m.logprob_dtype) == (8, 768, "uint16", "float16")
    examples = data.read_examples(files["train"])
    rows = data.tokenize_examples(examples, tiny_tokenizer, MAX_LENGTH, MAX_PROMPT)
    assert cache.num_examples("train") == len(rows) == m.splits["train"].examples
    for i, row in enumerate(rows):
        ids, lp, tail = cache.raw_rows("train", i)
        x = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logits = tiny_teacher(input_ids=x).logits[0, :-1].double()
        keep = torch.tensor(row["labels"][1:]) != -100
        ref = torch.log_softmax(logits[keep], -1)  # (n, V)
        assert ids.shape == (int(keep.sum()), 8) == lp.shape
        got = ref.gather(1, torch.from_numpy(ids.astype(np.int64)))
        # the stored values are the reference's at the stored ids, rounded to fp16 ...
        torch.testing.assert_close(torch.from_numpy(lp.astype(np.float64)), got, rtol=2e-3, atol=1e-4)
        # ... and those ids are the top 8 (up to near-ties at the boundary)
        assert bool((got.min(1).values >= ref.topk(8, 1).values[:, -1] - 1e-4).all())
        rest = torch.ones_like(ref, dtype=torch.bool).scatter(
            1, torch.from_numpy(ids.astype(np.int64)), False
        )
        want_tail = torch.logsumexp(ref.masked_fill(~rest, float("-inf")), -1)
        torch.testing.assert_close(torch.from_numpy(tail).double(), want_tail, rtol=0, atol=1e-4)


def test_random_access_reads_the_trainers_rows(built, files, tiny_tokenizer):
    cache = open_cache(built)
    rows = data.tokenize_examples(data.read_examples(files["train"]), tiny_tokenizer, MAX_LENGTH, MAX_PROMPT)
    assert cache.example_tokens("train").tolist() == [response_tokens(r) for r in rows]
    order = [9, 0, 5, 11, 4]  # across shards, out of order
    got = cache.rows("train", order)
    parts = [cache.raw_rows("train", i) for i in order]
    assert torch.equal(got.topk_ids, torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.int64)))
    # renormalised over the k + 1 outcomes (absorbs the fp16 rounding): a distribution
    total = torch.logsumexp(torch.cat([got.topk_logprobs, got.tail_logmass[:, None]], 1), 1)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-6)
    # the same row count as the student's response positions of that micro-batch
    batch = batches.collate([rows[i] for i in order], tiny_tokenizer.pad_token_id)
    assert got.topk_ids.shape[0] == int((batch["labels"][:, 1:] != -100).sum())
    with pytest.raises(IndexError):
        cache.raw_rows("train", 12)


def test_manifest_records_what_the_issue_asks(built, files):
    m = json.loads((built / "manifest.json").read_text())
    for key in (
        "teacher",
        "teacher_weights_sha256",
        "tokenizer_sha256",
        "max_length",
        "max_prompt_length",
        "top_k",
        "id_dtype",
        "logprob_dtype",
        "tokens",
        "examples",
        "bytes",
        "bytes_per_token",
        "shards",
        "splits",
        "teacher_eval",
    ):
        assert key in m, key
    train = m["splits"]["train"]
    assert train["sha256"] == __import__("hashlib").sha256(files["train"].read_bytes()).hexdigest()
    assert train["resolved_format"] == "prompt_response"
    assert (
        m["bytes"]
        == sum(s["bytes"] for s in m["shards"])
        == sum((built / s["file"]).stat().st_size for s in m["shards"])
    )
    assert m["bytes_per_token"] == pytest.approx(m["bytes"] / m["tokens"])
    # k = 8, V = 768: uint16 ids + fp16 log-probs + an fp32 tail = 36 B, plus headers and offsets
    assert 36 <= m["bytes_per_token"] < 60
    assert set(m["teacher_eval"]) >= {"rouge_l", "rouge_l_std", "num_examples", "key"}
    assert len(m["shards"]) == 3 + 1 and [s["split"] for s in m["shards"]].count("validation") == 1


# -- integrity -------------------------------------------------------------------------------------


def _copy(built: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(built, target)
    return target


def test_corrupt_shard_is_invalid_cache(built, tmp_path):
    cache = _copy(built, tmp_path)
    shard = cache / "train-00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-10] ^= 0xFF  # one bit pattern in the tensor data: same size, different bytes
    shard.write_bytes(bytes(blob))
    with pytest.raises(DistillError) as err:
        open_cache(cache)
    assert err.value.code == "invalid_cache" and "sha256" in err.value.message


def test_truncated_or_missing_shard_is_invalid_cache(built, tmp_path):
    cache = _copy(built, tmp_path)
    shard = cache / "train-00002.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(DistillError) as err:
        open_cache(cache)
    assert err.value.code == "invalid_cache" and "truncated" in err.value.message
    shard.unlink()
    with pytest.raises(DistillError, match="missing") as err:
        open_cache(cache)
    (cache / "manifest.json").unlink()
    with pytest.raises(DistillError, match="not a complete teacher cache"):
        open_cache(cache)


def test_a_job_on_a_corrupt_cache_fails_with_invalid_cache(built, files, caches_env, models_root):
    cache = caches_env / "corrupt"
    shutil.copytree(built, cache)
    shard = cache / "train-00000.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    events: list[dict] = []
    with pytest.raises(DistillError):
        distill(
            job_spec(files, "cache:corrupt"),
            caches_env / "run-corrupt",
            on_event=events.append,
            models_root=models_root,
        )
    assert events[-1]["type"] == "error" and events[-1]["code"] == "invalid_cache"


# -- building: bad input, stop, resume after SIGKILL ---------------------------------------------


def test_top_k_bounds(files, tmp_path, models_root):
    for bad in (0, 1025):
        with pytest.raises(ValueError, match="top_k"):
            cache_spec(files, top_k=bad)
    with pytest.raises(DistillError) as err:  # 1024 is a valid spec, but the tiny vocabulary is 768
        build_cache(cache_spec(files, top_k=1024), tmp_path / "big", models_root=models_root)
    assert err.value.code == "invalid_spec" and "768" in err.value.message
    events = read_events(tmp_path / "big" / "events.jsonl")
    assert events[-1]["type"] == "error" and events[-1]["code"] == "invalid_spec"


def test_cancel_keeps_finished_shards_and_resumes(files, tmp_path, models_root):
    out = tmp_path / "cancel"
    shards: list[dict] = []

    def on_event(event):
        if event["type"] == "shard":
            shards.append(event)

    result = build_cache(
        cache_spec(files), out, on_event=on_event, should_stop=lambda: bool(shards), models_root=models_root
    )
    assert result == {"status": "stopped", "done_shards": 1, "total_shards": 4}
    assert not (out / "manifest.json").exists() and (out / "train-00000.safetensors").is_file()
    before = (out / "train-00000.safetensors").stat()
    events: list[dict] = []
    result = build_cache(cache_spec(files), out, on_event=events.append, models_root=models_root)
    assert result["status"] == "completed"
    started = next(e for e in events if e["type"] == "started")
    assert started["resumed_shards"] == 1 and [e["index"] for e in events if e["type"] == "shard"] == [
        1,
        2,
        0,
    ]
    after = (out / "train-00000.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


def _runner(spec_path: Path, out: Path, models_root: Path) -> subprocess.Popen:
    env = {**os.environ, "AKL_MODELS_ROOT": str(models_root), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "akl_core.cache_runner", str(spec_path), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _read_until(proc: subprocess.Popen, kind: str, count: int) -> list[dict]:
    events = []
    assert proc.stdout is not None
    for line in proc.stdout:
        events.append(json.loads(line))
        if sum(e["type"] == kind for e in events) >= count:
            return events
    raise AssertionError(f"the runner ended before {count} {kind} events: {events}")


@pytest.mark.slow  # three runner processes: ~50 s on 2 busy cores
def test_runner_sigterm_then_sigkill_then_resume(files, tmp_path, models_root, built):
    """SIGTERM: a `stopped` event and exit 3. SIGKILL: whatever was finished stays. The last run
    rebuilds only the missing shards, and the cache holds the same rows as an uninterrupted build."""
    spec = cache_spec(files, shard_examples=1, batch_size=1)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    out = tmp_path / "cache"

    proc = _runner(spec_path, out, models_root)
    _read_until(proc, "shard", 1)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3 and json.loads(rest.splitlines()[-1])["type"] == "stopped"

    proc = _runner(spec_path, out, models_root)
    events = _read_until(proc, "shard", 2)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=60)
    assert next(e for e in events if e["type"] == "started")["resumed_shards"] >= 1
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*-*.safetensors")}
    assert len(finished) >= 3 and not (out / "manifest.json").exists()

    proc = _runner(spec_path, out, models_root)
    out_text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out_text
    events = [json.loads(line) for line in out_text.splitlines()]
    started = next(e for e in events if e["type"] == "started")
    assert started["resumed_shards"] == len(finished) and started["total_shards"] == 16
    assert len([e for e in events if e["type"] == "shard"]) == 16 - len(finished)
    for name, stamp in finished.items():
        p = out / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{name} was rewritten"
    # the same content as the uninterrupted build (batching changes fp32 rounding, hence atol)
    a, b = open_cache(out), open_cache(built)
    for split, n in (("train", 12), ("validation", 4)):
        rows_a, rows_b = a.rows(split, list(range(n))), b.rows(split, list(range(n)))
        torch.testing.assert_close(rows_a.topk_logprobs, rows_b.topk_logprobs, rtol=0, atol=2e-3)
        torch.testing.assert_close(rows_a.tail_logmass, rows_b.tail_logmass, rtol=0, atol=2e-3)


def test_runner_invalid_spec_exits_1(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"teacher": "preset:tiny", "data": {"train": "demo:train"}, "top_k": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "akl_core.cache_runner", str(bad), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    (event,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert event["type"] == "error" and event["code"] == "invalid_spec" and "top_k" in event["message"]


# -- a job against its cache -----------------------------------------------------------------------


def job_spec(files, teacher: str, loss: str | dict = "akl", training: dict | None = None, **sections):
    return load_spec(
        {
            "teacher": teacher,
            "student": {"init": "truncate", "num_layers": 2},
            "data": {"train": str(files["train"]), "validation": str(files["validation"])},
            "loss": loss if isinstance(loss, dict) else {"name": loss},
            "training": {
                "max_steps": 4,
                "batch_size": 3,
                "learning_rate": 3e-3,
                "max_length": MAX_LENGTH,
                "max_prompt_length": MAX_PROMPT,
                **(training or {}),
            },
            "evaluation": {"num_examples": 0},
            **sections,
        }
    )


def test_cache_refs_stay_inside_the_caches_root(tmp_path):
    assert resolve_cache_ref("cache:a/b", tmp_path) == (tmp_path / "a" / "b").resolve()
    for bad in ("cache:../x", "cache:/etc", "cache:a/../../x", "cache:."):
        with pytest.raises(ValueError):
            resolve_cache_ref(bad, tmp_path)
    for bad in ("cache:../x", "cache:/etc"):
        with pytest.raises(ValueError, match="caches root"):
            load_spec({"teacher": bad, "data": {"train": "demo:train"}})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"data": "other"}, "data.train"),
        ({"training": {"max_length": 48}}, "training.max_length"),
        ({"training": {"max_prompt_length": 16}}, "training.max_prompt_length"),
        ({"data_format": "messages"}, "data.format"),
    ],
)
def test_a_mismatched_job_names_the_field(change, field, built, files, caches_env, models_root):
    spec = job_spec(files, "cache:k8", training=change.get("training"))
    raw = spec.model_dump()
    if "data" in change:
        raw["data"]["train"] = str(files[change["data"]])
    if "data_format" in change:
        raw["data"]["format"] = change["data_format"]
    spec = load_spec(raw)
    # the torch-free check the API runs at submission ...
    if field != "data.format":
        digest = __import__("hashlib").sha256(Path(spec.data.train).read_bytes()).hexdigest()
        assert [f for f, _ in job_mismatches(spec, read_manifest(built), train_sha256=digest)] == [field]
    # ... and the trainer's, before any step
    with pytest.raises(DistillError) as err:
        distill(spec, caches_env / f"run-{field}", models_root=models_root)
    assert err.value.code == "invalid_cache" and field in err.value.message


def test_truncate_reads_only_the_kept_tensors(tiny_teacher_path):
    lazy = truncated_from_files(tiny_teacher_path, 2)
    full = students.build_student(StudentSpec(init="truncate", num_layers=2), tiny_teacher_path)
    a, b = lazy.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- training from a cache -------------------------------------------------------------------------


def _steps(events):
    return [e for e in events if e["type"] == "step"]


@pytest.mark.parametrize(
    ("loss", "fused"), [("akl", False), pytest.param("fkl_rkl", True, marks=pytest.mark.slow)]
)
def test_k_equal_to_v_trains_like_the_online_teacher(loss, fused, files, caches_env, models_root):
    """With k = V the sparse loss is the dense one: the same run, up to the fp16 cache rounding
    (seen: 1e-4 relative on kd, whose terms are small differences of log-probs near -6.6)."""
    out = caches_env / "kV"
    if not (out / "manifest.json").is_file():
        build_cache(cache_spec(files, top_k=768), out, models_root=models_root)
    extra = {"loss": {"name": loss, "fused": fused}}  # passed as job_spec's loss
    online, cached = [], []
    distill(
        job_spec(files, "preset:tiny", extra["loss"]),
        caches_env / f"online-{loss}",
        on_event=online.append,
        models_root=models_root,
    )
    distill(
        job_spec(files, "cache:kV", extra["loss"]),
        caches_env / f"cached-{loss}",
        on_event=cached.append,
        models_root=models_root,
    )
    for key in ("loss", "ce", "kd", "grad_norm", "g_head", "g_tail", "fkl", "rkl"):
        assert [e[key] for e in _steps(cached)] == pytest.approx(
            [e[key] for e in _steps(online)], rel=2e-3
        ), key
    assert [e["tokens"] for e in _steps(cached)] == [e["tokens"] for e in _steps(online)]


def test_training_from_a_cache_resumes_exactly(built, files, caches_env, models_root):
    """4 straight steps == 2 steps + stop + resume + 2 steps: the same losses and identical weights;
    evaluation reads the teacher's line and val_kl from the cache."""
    from safetensors.torch import load_file

    spec = job_spec(files, "cache:k8", evaluation={"num_examples": 2, "seeds": [1], "max_new_tokens": 4})
    straight: list[dict] = []
    distill(spec, caches_env / "straight", on_event=straight.append, models_root=models_root)
    calls = {"n": 0}

    def stop_after_2():
        calls["n"] += 1
        return calls["n"] >= 2

    first: list[dict] = []
    result = distill(
        spec, caches_env / "resumed", on_event=first.append, should_stop=stop_after_2, models_root=models_root
    )
    assert result["status"] == "stopped" and result["step"] == 2
    second: list[dict] = []
    distill(spec, caches_env / "resumed", on_event=second.append, models_root=models_root)
    keys = ("loss", "ce", "kd", "lr", "grad_norm", "tokens", "trained_tokens", "w_head")
    resumed = _steps(first) + _steps(second)
    assert [[e[k] for k in keys] for e in resumed] == [[e[k] for k in keys] for e in _steps(straight)]
    w1 = load_file(caches_env / "straight" / "final" / "model.safetensors")
    w2 = load_file(caches_env / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    (ev,) = [e for e in straight if e["type"] == "eval"]
    stored = read_manifest(built).teacher_eval
    assert ev["teacher_rouge_l"] == stored["rouge_l"]  # the line scored at build time
    assert ev["val_kl"] is not None and 0 < ev["val_kl"] < 10


def test_the_training_process_never_loads_the_teacher(built, files, caches_env, models_root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(models, "load_teacher", refuse)
    monkeypatch.setattr(students, "load_causal_lm", refuse)  # truncate reads tensors, not the model
    result = distill(
        job_spec(files, "cache:k8", training={"max_steps": 1}),
        caches_env / "no-teacher",
        models_root=models_root,
    )
    assert result["status"] == "completed"


# -- the real teacher ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_teacher_k64_is_under_400_bytes_per_token(tmp_path, files, smollm2_path):
    """SmolLM2-135M-Instruct, k = 64: the issue's goal of at most 400 B/token (dense fp16 is 98 KB)."""
    root = smollm2_path.parent  # the session's converted teacher (tests/conftest.py)
    spec = CacheSpec.model_validate(
        {
            "teacher": "preset:smollm2-135m-instruct",
            "data": {"train": str(files["validation"]), "max_length": 128, "max_prompt_length": 64},
            "top_k": 64,
            "evaluation": {"num_examples": 0},
        }
    )
    result = build_cache(spec, tmp_path / "real", models_root=root)
    m = result["manifest"]
    assert m["vocab_size"] == 49152 and m["id_dtype"] == "uint16"
    assert m["bytes_per_token"] <= 400
    open_cache(tmp_path / "real")  # sizes and digests check out


def test_cli_cache_info_and_verify(built, tmp_path):
    from typer.testing import CliRunner

    from akl_core.cli import cache_app

    runner = CliRunner()
    result = runner.invoke(cache_app, ["info", str(built), "--verify"])
    assert result.exit_code == 0, result.output
    assert (
        "top_k       8 of 768" in result.output and "B/token" in result.output and "verified" in result.output
    )
    broken = _copy(built, tmp_path)
    (broken / "validation-00000.safetensors").write_bytes(b"")
    result = runner.invoke(cache_app, ["info", str(broken), "--verify"])
    assert result.exit_code == 1 and "invalid_cache" in result.output
