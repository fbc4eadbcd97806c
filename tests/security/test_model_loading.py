"""Static guarantees over the whole code base (a new call site cannot forget them): model code from
a model directory is never run (``trust_remote_code`` is never on), and weights load from
safetensors only, never from a pickle. tests/reliability/test_failing_jobs.py shows the same at
run time: a model with custom code or only a pickle fails the job and runs nothing."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("akl_core", "api", "worker", "akl_cli")


def _calls() -> Iterator[tuple[str, ast.Call]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield f"{path.relative_to(REPO)}:{node.lineno}", node


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_the_scan_sees_the_loading_code() -> None:
    names = [_name(call.func) for _, call in _calls()]
    assert sum(n.endswith("from_pretrained") for n in names) >= 5


def test_trust_remote_code_is_never_on() -> None:
    for where, call in _calls():
        value = _kw(call, "trust_remote_code")
        assert value is None or _is_const(value, False), f"{where}: trust_remote_code must be False"
        assert not any(
            k.arg is None for k in call.keywords if _name(call.func).endswith("from_pretrained")
        ), f"{where}: **kwargs into from_pretrained could switch trust_remote_code on"


def test_models_load_from_safetensors_only() -> None:
    """Every model ``from_pretrained`` passes use_safetensors=True; the one exception is the GGUF
    conversion of the packaged teacher (a GGUF file is not a pickle)."""
    for where, call in _calls():
        name = _name(call.func)
        if not name.endswith(".from_pretrained") or "Tokenizer" in name or "Config" in name:
            continue
        if _kw(call, "gguf_file") is not None:
            continue
        assert _is_const(_kw(call, "use_safetensors"), True), f"{where}: {name} without use_safetensors=True"


def test_no_pickle_is_loaded() -> None:
    """torch.load only with weights_only=True; no pickle.load at all."""
    for where, call in _calls():
        name = _name(call.func)
        assert name not in ("pickle.load", "pickle.loads"), where
        if name == "torch.load":
            assert _is_const(_kw(call, "weights_only"), True), (
                f"{where}: torch.load without weights_only=True"
            )
