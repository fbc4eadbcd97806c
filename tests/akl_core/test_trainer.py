"""The training loop: loss normalisation against a plain full-batch reference, exact resume,
output layout and events, data order, schedule, error codes. Tiny models only."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from akl_core import batches, data, optim, trainer
from akl_core import checkpoint as ckpt
from akl_core.ddp import DistInfo
from akl_core.events import STEP_STATS, DistillError, read_events
from akl_core.spec import load_spec, total_steps
from akl_core.steps import ResponseLogits, StepContext, micro_loss, train_step

STEP_KEYS = [
    "type",
    "time",
    "step",
    "total_steps",
    "epoch",
    "loss",
    "ce",
    "kd",
    "lr",
    "grad_norm",
    "tokens",
    "trained_tokens",
    "tokens_per_s",
    *STEP_STATS,
]


def tiny_spec(loss: str = "akl", training: dict | None = None, **sections):
    raw = {
        "teacher": "preset:tiny",
        "student": {"init": "truncate", "num_layers": 1},
        "data": {"train": "demo:train", "max_train_examples": 24},
        "loss": {"name": loss},
        "training": {
            "max_steps": 4,
            "batch_size": 2,
            "learning_rate": 3e-3,
            "max_length": 64,
            "max_prompt_length": 32,
            "warmup_steps": 1,
            **(training or {}),
        },
        "evaluation": {"num_examples": 0},
        **sections,
    }
    return load_spec(raw)


def run(spec, out: Path, models_root: Path, **kw):
    events: list[dict] = []
    result = trainer.distill(spec, out, on_event=events.append, models_root=models_root, **kw)
    return result, events


def steps(events):
    return [e for e in events if e["type"] == "step"]


# -- one optimizer step against a full-batch reference -------------------------------------------


def _batches(tokenizer, n: int, per: int):
    examples = data.read_examples("demo:train", "auto", n)
    rows = data.tokenize_examples(examples, tokenizer, 128, 24)
    return [
        batches.collate(rows[i : i + per], tokenizer.pad_token_id) for i in range(0, n, per)
    ], batches.collate(rows, tokenizer.pad_token_id)


def _reference_grads(student, teacher, full, name: str, r: float):
    """(1-r) CE + r KD, both means over every valid token of the global batch, from full logits."""
    from akl_core import divergences

    s = student(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1]
    y = full["labels"][:, 1:]
    keep = y != -100
    ce = F.cross_entropy(s[keep], y[keep])
    if name == "fkl":  # straight from the formula
        lp, lq = t[keep].log_softmax(-1), s[keep].log_softmax(-1)
        kd = (lp.exp() * (lp - lq)).sum(-1).mean()
    elif name == "akl":
        kd = divergences.compute("akl", s, t, y).loss
    else:
        kd = ce * 0
    loss = (1 - r) * ce + r * kd
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("name", ["sft", "fkl", "akl"])
def test_train_step_matches_full_batch_reference(name, tiny_student, tiny_teacher, tiny_tokenizer):
    """Two micro-batches of different padded widths, normalised once by the global token count,
    give the gradient of the full-batch mean loss."""
    spec = tiny_spec(name, {"max_grad_norm": 0.0})
    micro, full = _batches(tiny_tokenizer, 4, 2)
    assert micro[0]["input_ids"].shape[1] != micro[1]["input_ids"].shape[1]
    ref_model = copy.deepcopy(tiny_student)
    ref_loss, ref_grads = _reference_grads(ref_model, tiny_teacher, full, name, spec.loss.kd_ratio)

    before = {n: p.detach().clone() for n, p in tiny_student.named_parameters()}
    opt = torch.optim.SGD(tiny_student.parameters(), lr=1.0)  # new = old - grad
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    vocab = tiny_teacher.get_output_embeddings().weight.shape[0]
    ctx = StepContext(ResponseLogits(tiny_student), ResponseLogits(tiny_teacher), spec, vocab)
    sums, grad_norm = train_step(ctx, micro, opt, sched)
    r = spec.loss.kd_ratio
    assert ((1 - r) * sums.ce + r * sums.kd) / sums.tokens == pytest.approx(ref_loss, rel=1e-5)
    assert sums.tokens == int((full["labels"][:, 1:] != -100).sum())
    for n, p in tiny_student.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), ref_grads[n], rtol=1e-4, atol=1e-6)
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()]))
    assert grad_norm == pytest.approx(float(ref_norm), rel=1e-4)
    # gap stats come with every loss (sft and fkl through all_stats): means over tokens
    assert 0.0 <= sums.stats["w_head"] / sums.tokens <= 1.0
    assert sums.stats["g_head"] > 0 and sums.stats["g_tail"] > 0


def test_grad_accum_equals_bigger_batch(models_root, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 see the same examples per step: same losses.
    The second run reuses the directory with resume=False: it starts afresh, events included."""
    a, ea = run(tiny_spec(training={"batch_size": 4}), tmp_path / "a", models_root)
    b, eb = run(
        tiny_spec(training={"batch_size": 2, "grad_accum": 2}), tmp_path / "a", models_root, resume=False
    )
    la, lb = [e["loss"] for e in steps(ea)], [e["loss"] for e in steps(eb)]
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5)
    assert a["trained_tokens"] == b["trained_tokens"]
    assert read_events(tmp_path / "a" / "events.jsonl") == json.loads(json.dumps(eb))


# -- resume --------------------------------------------------------------------------------------


def _weights(path: Path):
    from safetensors.torch import load_file

    return load_file(path / "final" / "model.safetensors")


def test_resume_is_exact(models_root, tmp_path):
    """5 steps + stop + resume + 5 steps == 10 straight steps (losses, lr, final weights)."""
    spec = tiny_spec(training={"max_steps": 10, "warmup_steps": 2})
    straight, e_straight = run(spec, tmp_path / "straight", models_root)

    count = {"n": 0}

    def stop_after_5():
        count["n"] += 1
        return count["n"] >= 5

    first, e1 = run(spec, tmp_path / "resumed", models_root, should_stop=stop_after_5)
    assert first["status"] == "stopped" and first["step"] == 5
    assert e1[-1] == {"type": "stopped", "step": 5, "checkpoint": "checkpoints/step-00000005"}
    second, e2 = run(spec, tmp_path / "resumed", models_root)
    assert e2[1]["type"] == "started" and e2[1]["resumed_from_step"] == 5
    resumed = steps(e1) + steps(e2)
    assert [e["step"] for e in resumed] == list(range(1, 11))
    for key in ("loss", "ce", "kd", "lr", "grad_norm", "tokens", "trained_tokens", "w_head"):
        assert [e[key] for e in resumed] == pytest.approx([e[key] for e in steps(e_straight)], rel=1e-6), key
    w_straight, w_resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k in w_straight:
        torch.testing.assert_close(w_resumed[k], w_straight[k], rtol=1e-6, atol=1e-7)
    # the events file continues across the restart
    on_disk = read_events(tmp_path / "resumed" / "events.jsonl")
    assert [e["type"] for e in on_disk].count("started") == 2 and on_disk[-1]["type"] == "completed"
    # a completed run is not trained again (a worker retry); it reports the stored result
    again, e3 = run(spec, tmp_path / "resumed", models_root)
    assert [e["type"] for e in e3] == ["log", "completed"]
    assert again["step"] == 10 and again["trained_tokens"] == second["trained_tokens"]


# -- output layout and events --------------------------------------------------------------------


def test_layout_events_and_rotation(models_root, tmp_path):
    spec = tiny_spec(
        training={"max_steps": 6},
        data={
            "train": "demo:train",
            "validation": "demo:validation",
            "max_train_examples": 24,
            "max_validation_examples": 3,
        },
        evaluation={"every_steps": 3, "num_examples": 2, "seeds": [1, 2], "max_new_tokens": 4},
        checkpointing={"every_steps": 2, "keep": 1},
    )
    out = tmp_path / "run"
    result, events = run(spec, out, models_root)
    types = [e["type"] for e in events]
    assert types[:2] == ["loading", "started"] and types[-1] == "completed"
    assert types.count("step") == 6 and types.count("eval") == 2 and types.count("checkpoint") == 2
    for e in steps(events):
        assert list(e) == STEP_KEYS
        assert all(math.isfinite(e[k]) for k in STEP_KEYS[1:])
    assert (
        sum(e["tokens"] for e in steps(events))
        == steps(events)[-1]["trained_tokens"]
        == result["trained_tokens"]
    )
    # warmup 1: the first step already trains (lr > 0), cosine decays afterwards
    lrs = [e["lr"] for e in steps(events)]
    assert lrs[0] == pytest.approx(3e-3 / 2) and lrs[1] == pytest.approx(3e-3) and lrs[-1] < lrs[2]
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [3, 6]
    assert all(e["num_examples"] == 2 and e["teacher_rouge_l"] is not None for e in evals)
    # events.jsonl holds exactly what the callback saw (as strict JSON)
    assert read_events(out / "events.jsonl") == json.loads(json.dumps(events))
    # keep=1: only the newest checkpoint survives; it is complete
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-00000004"]
    state = json.loads((out / "checkpoints/step-00000004/state.json").read_text())
    assert state["step"] == 4 and state["index"] == 8
    assert (out / "final/model.safetensors").is_file() and (out / "final/tokenizer_config.json").is_file()
    assert json.loads((out / "result.json").read_text())["step"] == 6
    assert (out / "teacher_eval.json").is_file()


def test_eval_at_start_scores_the_untrained_student(models_root, tmp_path, tiny_teacher, tiny_tokenizer):
    """evaluation.at_start: an eval at step 0, before the first step, of the untrained student."""
    split = {"train": "demo:train", "validation": "demo:validation", "max_train_examples": 24}
    evaluation = {"num_examples": 2, "seeds": [1], "max_new_tokens": 4, "at_start": True}
    spec = tiny_spec(
        training={"max_steps": 3}, data={**split, "max_validation_examples": 3}, evaluation=evaluation
    )
    _, events = run(spec, tmp_path / "run", models_root)
    types = [e["type"] for e in events]
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3]
    assert types.index("eval") < types.index("step")
    # the step-0 eval is the truncated student before any update, computed here directly
    from akl_core import evaluation as akl_eval
    from akl_core.students import build_student

    student = build_student(spec.student, models_root / "tiny").eval()
    val = data.read_examples("demo:validation", limit=3)
    tokenized = [data.tokenize_example(ex, tiny_tokenizer, 64, 32) for ex in val]
    with torch.no_grad():
        ref = akl_eval.validation_losses(student, tiny_teacher, tokenized, tiny_tokenizer.pad_token_id)
    assert evals[0]["val_kl"] == pytest.approx(ref["val_kl"], rel=1e-4)


def test_gradient_checkpointing_changes_nothing(models_root, tmp_path):
    spec = tiny_spec(training={"max_steps": 2})
    _, plain = run(spec, tmp_path / "a", models_root)
    _, gc = run(
        tiny_spec(training={"max_steps": 2, "gradient_checkpointing": True}), tmp_path / "b", models_root
    )
    assert [e["loss"] for e in steps(gc)] == pytest.approx([e["loss"] for e in steps(plain)], rel=1e-5)


def test_fused_matches_unfused(models_root, tmp_path):
    pytest.importorskip("akl_core.fused")
    _, plain = run(tiny_spec(training={"max_steps": 2}), tmp_path / "a", models_root)
    spec = tiny_spec(training={"max_steps": 2})
    spec.loss.fused = True
    _, fused = run(spec, tmp_path / "b", models_root)
    for key in ("loss", "ce", "kd", "grad_norm", "w_head"):
        assert [e[key] for e in steps(fused)] == pytest.approx([e[key] for e in steps(plain)], rel=1e-4), key


# -- errors --------------------------------------------------------------------------------------


def test_nan_loss_stops_with_code(models_root, tmp_path, monkeypatch):
    real = micro_loss

    def poisoned(*args, **kw):
        ce, kd, stats, n = real(*args, **kw)
        return ce * float("nan"), kd, stats, n

    monkeypatch.setattr("akl_core.steps.micro_loss", poisoned)
    with pytest.raises(DistillError) as info:
        run(tiny_spec(), tmp_path / "nan", models_root)
    assert info.value.code == "nan_loss" and "learning_rate" in info.value.message
    last = read_events(tmp_path / "nan" / "events.jsonl")[-1]
    assert last["type"] == "error" and last["code"] == "nan_loss"
    assert not (tmp_path / "nan" / "final").exists()


@pytest.mark.parametrize(
    ("change", "code"),
    [({"teacher": "preset:nope"}, "model_not_found"), ({"data": {"train": "missing.jsonl"}}, "invalid_data")],
)
def test_error_codes(models_root, tmp_path, change, code):
    raw = tiny_spec().model_dump()
    raw.update(change)
    with pytest.raises(DistillError) as info:
        run(load_spec(raw), tmp_path / "err", models_root)
    assert info.value.code == code


# -- data order and schedule ---------------------------------------------------------------------


def test_data_order_epochs_and_ranks():
    order = batches.DataOrder(10, seed=3)
    state = ckpt.TrainState()
    seen = [order.take(state, 4) for _ in range(3)]
    assert [len(s) for s in seen] == [4, 4, 2]  # the epoch's last step is short
    assert sorted(sum(seen, [])) == list(range(10))
    nxt = order.take(state, 4)
    assert (
        state.epoch == 1 and nxt == order.permutation(1)[:4] and order.permutation(1) != order.permutation(0)
    )
    assert batches.DataOrder(10, seed=3).permutation(0) == order.permutation(0)
    ids = list(range(100, 108))
    one = batches.micro_batches(ids, 4, 2, DistInfo(0, 1))
    two = [batches.micro_batches(ids, 2, 2, DistInfo(r, 2)) for r in range(2)]
    assert sorted(sum(one, [])) == sorted(sum(two[0] + two[1], [])) == ids
    # micro-batch m of the 2-process run holds the same examples as micro-batch m of 1 process
    assert [two[0][m] + two[1][m] for m in range(2)] == one


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("cosine", [0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]),
        ("linear", [0.5, 1.0, 2 / 3, 1 / 3]),
        ("constant", [0.5, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_factor(scheduler, expected):
    spec = tiny_spec(training={"scheduler": scheduler, "warmup_steps": 1})
    assert [optim.lr_factor(s, spec, 4) for s in range(4)] == pytest.approx(expected)


def test_total_steps_from_epochs():
    spec = tiny_spec(training={"max_steps": None, "epochs": 3, "batch_size": 2, "grad_accum": 2})
    assert total_steps(spec, 10, world_size=1) == 3 * 3
    assert total_steps(spec, 10, world_size=2) == 3 * 2
