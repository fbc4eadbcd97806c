"""The real teacher (SmolLM2-135M-Instruct) into a 6-layer truncated student on the demo data:
20 AKL steps; the KD loss and the student's validation KL to the teacher both fall."""

from __future__ import annotations

import statistics

import pytest

from akl_core import data, evaluation, models, students, trainer
from akl_core.spec import load_spec

# ~1-2 min on a quiet 2-core machine; ~630 s was seen under a load average of 6-8, over the
# suite's 600 s default (pyproject), so this one test gets more room
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_real_teacher_kd_and_val_kl_fall(smollm2_path, tmp_path):
    root = smollm2_path.parent
    spec = load_spec(
        {
            "teacher": f"preset:{models.SMOLLM2}",
            "student": {"init": "truncate", "num_layers": 6},
            "data": {"train": "demo:train", "validation": "demo:validation", "max_validation_examples": 4},
            "loss": {"name": "akl", "kd_ratio": 0.5},
            "training": {
                "max_steps": 20,
                "batch_size": 4,
                "learning_rate": 1e-4,
                "warmup_steps": 2,
                "max_length": 128,
                "max_prompt_length": 64,
            },
            "evaluation": {"num_examples": 0},
        }
    )
    # the student's validation KL before training (same truncation, same validation tokens)
    tok = models.load_tokenizer(smollm2_path)
    teacher = models.load_teacher(smollm2_path)
    student = students.build_student(spec.student, smollm2_path, root)
    val = data.read_examples("demo:validation", "auto", 4)
    rows = [data.tokenize_example(ex, tok, 128, 64) for ex in val]
    before = evaluation.validation_losses(student, teacher, rows, tok.pad_token_id)
    del student, teacher

    events: list[dict] = []
    result = trainer.distill(spec, tmp_path / "run", on_event=events.append, models_root=root)
    kd = [e["kd"] for e in events if e["type"] == "step"]
    assert len(kd) == 20
    assert statistics.fmean(kd[-5:]) < 0.8 * statistics.fmean(kd[:5])
    after = result["metrics"]
    assert after["val_tokens"] == before["val_tokens"]
    assert after["val_kl"] < before["val_kl"]
    assert after["val_ce"] < before["val_ce"]
