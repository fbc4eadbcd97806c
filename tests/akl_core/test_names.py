"""akl_core/names.py: one list of loss names for the job spec and the divergences, torch-free."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from pydantic import ValidationError

from akl_core import divergences, names, spec
from akl_core.divergences import definitions, rows


def test_the_spec_and_the_divergences_share_the_names():
    field = spec.LossSpec.model_fields["name"].annotation
    assert typing.get_args(field) == names.LOSS_NAMES
    assert divergences.NAMES == names.DIVERGENCE_NAMES == tuple(n for n in names.LOSS_NAMES if n != "sft")
    assert set(rows.PER_TOKEN) == set(divergences.NAMES)
    assert not hasattr(spec, "DIVERGENCES") and not hasattr(spec, "LOSS_NAMES")


@pytest.mark.parametrize("name", names.LOSS_NAMES)
def test_every_name_is_a_valid_spec_loss(name):
    assert spec.LossSpec(name=name).name == name


def test_an_unknown_loss_is_refused_by_the_spec():
    with pytest.raises(ValidationError, match="name"):
        spec.LossSpec(name="kl")


def test_every_divergence_has_a_definition():
    import torch

    z = torch.randn(3, 11, dtype=torch.float64)
    opts = divergences.DivergenceOptions()
    for name in divergences.NAMES:
        loss, _ = definitions.per_token(name, z + 0.1 * torch.randn_like(z), z, opts)
        assert loss.shape == (3,) and bool((loss >= -1e-12).all()), name


def test_what_the_api_imports_from_akl_core_is_torch_free():
    # api/core/job_refs.py takes the presets and demo splits from akl_core at import
    code = (
        "import sys\n"
        "import akl_core.names, akl_core.spec, akl_core.models, akl_core.data\n"
        "assert akl_core.models.PRESETS and akl_core.data.BUILTIN_REFS\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
