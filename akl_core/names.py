"""The loss names, one list for the job spec and the divergences.

``akl_core.spec.LossSpec.name`` is a ``LossName``; ``akl_core.divergences.NAMES`` are the
divergences among them. Torch-free: the API validates job specs with it.
"""

from __future__ import annotations

from typing import Literal, get_args

# The paper's losses and baselines (docs/method.md): "sft" is plain fine-tuning (kd_ratio 0,
# the divergence only monitored), every other name is a divergence of akl_core.divergences.
LossName = Literal["fkl", "rkl", "fkl_rkl", "akl", "akl_r", "skl", "srkl", "tvd", "jsd", "sft"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)
DIVERGENCE_NAMES: tuple[str, ...] = tuple(name for name in LOSS_NAMES if name != "sft")
