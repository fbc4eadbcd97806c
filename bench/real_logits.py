"""Real teacher and student logits for the divergence benchmark, cached on disk.

Teacher: the SmolLM2-135M-Instruct preset (``akl models prepare smollm2-135m-instruct``; built
here when missing). Student: its first-and-last-layer truncation to ``layers`` layers, as a job's
``student: {init: truncate}`` builds it. Both are teacher-forced on the demo validation set;
only the response tokens are kept (position t predicts token t + 1, as in the trainer), giving
(N, V) fp32 logits, N ~ 1450 and V = 49152 with the defaults.

Synthetic logits (bench/divergences.py ``make_logits``) are far more peaked than these: on real
rows the teacher's top-1 exceeds 0.5 on ~18 % of tokens instead of ~79 %, so AKL's head search
meets many more flat rows (issue 15).
"""

from __future__ import annotations

from pathlib import Path

import torch

PRESET = "smollm2-135m-instruct"


def load(
    cache: Path, models_root: Path | None = None, layers: int = 6, max_length: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits (N, V) fp32 of the demo validation responses; cached in ``cache``."""
    if cache.is_file():
        saved = torch.load(cache)
        return saved["student"], saved["teacher"]
    student, teacher = _teacher_forced(models_root, layers, max_length)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"student": student, "teacher": teacher}, cache)
    return student, teacher


@torch.no_grad()
def _teacher_forced(
    models_root: Path | None, layers: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from akl_core import batches, data, models, students
    from akl_core.spec import StudentSpec

    path = models.prepare_preset(PRESET, models_root)
    tok = models.load_tokenizer(path)
    teacher = models.load_teacher(path).float().eval()
    student = students.build_student(StudentSpec(init="truncate", num_layers=layers), path, models_root)
    student = student.float().eval()
    rows = data.tokenize_examples(data.read_examples("demo:validation"), tok, max_length, max_length // 2)
    s_out, t_out = [], []
    for i in range(0, len(rows), 8):
        batch = batches.collate(rows[i : i + 8], tok.pad_token_id)
        keep = batch["labels"][:, 1:] != data.IGNORE_INDEX  # (B, T-1): position t predicts t + 1
        for model, out in ((student, s_out), (teacher, t_out)):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out.append(logits[:, :-1][keep].float())
    s, t = torch.cat(s_out), torch.cat(t_out)
    v = min(s.shape[-1], t.shape[-1])
    return s[:, :v].contiguous(), t[:, :v].contiguous()


def teacher_stats(teacher: torch.Tensor, temperature: float) -> dict:
    """What regime the rows are in: top-1 > 0.5 share, mean entropy (nats), AKL head sizes."""
    p_max, entropy = [], []
    for t in teacher.split(256):
        lp = torch.log_softmax(t.float() / temperature, -1)
        p_max.append(lp.amax(-1).exp())
        entropy.append(-(lp.exp() * lp).nan_to_num_().sum(-1))
    sizes = _head_sizes(teacher, temperature)
    return {
        "temperature": temperature,
        "tokens": teacher.shape[0],
        "vocab": teacher.shape[1],
        "top1_above_half": float((torch.cat(p_max) > 0.5).float().mean()),
        "mean_entropy_nats": float(torch.cat(entropy).mean()),
        "head_size_median": float(sizes.median()),
        "head_size_p90": float(sizes.quantile(0.9)),
        "head_size_max": float(sizes.max()),
    }


def _head_sizes(teacher: torch.Tensor, temperature: float, mu: float = 0.5) -> torch.Tensor:
    """AKL's head size per token from the full sort (shared/AKL.md): c_i <= mu, at least 1."""
    sizes = []
    for t in teacher.split(256):
        cum = torch.softmax(t.float() / temperature, -1).sort(-1, descending=True).values.cumsum(-1)
        sizes.append((cum <= mu).sum(-1).clamp_min(1))
    return torch.cat(sizes).float()
