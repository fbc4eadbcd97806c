"""Server paths never reach what a tenant reads (job errors, job events): RELIABILITY.md #8."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from api.core.config import Settings
from worker.redact import make_redactor, redact_value


def test_roots_become_placeholders_nested_roots_keep_their_own_name(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_root=tmp_path / "srv", models_root=tmp_path / "srv" / "models")
    redact = make_redactor(settings)
    text = (
        f"cannot load a causal LM (safetensors) from {tmp_path}/srv/models/x: bad; "
        f"see {tmp_path}/srv/artifacts/job_1/runner.log and {tmp_path}/srv/akl.db"
    )
    out = redact(text)
    assert out == (
        "cannot load a causal LM (safetensors) from <models>/x: bad; "
        "see <artifacts>/job_1/runner.log and <data>/akl.db"
    )
    assert str(tmp_path) not in out
    # Python's own paths in a message (an import error, a traceback line) go too
    assert redact(f'File "{sys.prefix}/lib/python3.11/site-packages/x.py"') == (
        'File "<python>/lib/python3.11/site-packages/x.py"'
    )


def test_a_symlinked_root_is_redacted_in_both_spellings(tmp_path: Path) -> None:
    real = tmp_path / "disk" / "models"
    real.mkdir(parents=True)
    link = tmp_path / "models-link"
    os.symlink(real, link)
    redact = make_redactor(Settings(_env_file=None, data_root=tmp_path / "data", models_root=link))
    assert redact(f"{link}/a and {real}/b") == "<models>/a and <models>/b"


def test_a_relative_root_and_nested_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    redact = make_redactor(Settings(_env_file=None, data_root=Path(".akl")))
    assert (
        redact("no directory .akl/models/x under the models root")
        == "no directory <models>/x under the models root"
    )
    assert redact(f"{tmp_path}/.akl/files/f.jsonl") == "<files>/f.jsonl"
    value = {"path": f"{tmp_path}/.akl/artifacts/j/checkpoint-2", "steps": [1, f"{tmp_path}/.akl/x"], "n": 3}
    assert redact_value(value, redact) == {
        "path": "<artifacts>/j/checkpoint-2",
        "steps": [1, "<data>/x"],
        "n": 3,
    }
    assert (
        redact("nothing to hide: model 'tiny' has no config.json")
        == "nothing to hide: model 'tiny' has no config.json"
    )
