"""The divergences' names, options and result (``compute``'s contract)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from torch import Tensor

from akl_core.contract import STEP_STATS as STAT_NAMES  # noqa: F401 - re-exported by the package
from akl_core.names import DIVERGENCE_NAMES

NAMES = DIVERGENCE_NAMES
# STAT_NAMES, the per-token statistics (fkl and rkl, and AKL's head / tail split; docs/method.md,
# "Definitions"), are part of the run contract: the step events and the metric columns carry them.


@dataclass(frozen=True)
class DivergenceOutput:
    """Result of ``compute``.

    loss: differentiable scalar, ``loss_sum / max(num_tokens, 1)`` (mean over valid tokens).
    loss_sum: differentiable scalar, the sum over valid tokens; under gradient accumulation a
        trainer sums these and divides once by the global count of valid tokens.
    num_tokens: number of tokens whose label is not ``ignore_index``.
    stats: plain floats, means over valid tokens (empty when there are none).
    """

    loss: Tensor
    loss_sum: Tensor
    num_tokens: int
    stats: dict[str, float]


@dataclass(frozen=True)
class DivergenceOptions:
    """Options shared by every divergence; validated when built.

    mu: AKL's head mass (paper: 0.5), in (0, 1).
    temperature: T > 0; p and q are softmax(logits / T).
    ignore_index: label value of masked tokens.
    lam: skew of SKL / SRKL (DistiLLM: 0.1), in [0, 1).
    beta: mixture weight of the generalized JSD (TRL's GKD), in (0, 1).
    chunk_size: tokens per chunk; None picks one from the vocabulary size and device.
    all_stats: also compute fkl, rkl and AKL's head statistics for divergences that do not
        need them (for monitoring; costs about one more pass).
    """

    mu: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    lam: float = 0.1
    beta: float = 0.5
    chunk_size: int | None = None
    all_stats: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.mu < 1.0:
            raise ValueError(f"mu must be in (0, 1), got {self.mu}")
        if not self.temperature > 0.0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 <= self.lam < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {self.lam}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1) (beta 0 / 1 are fkl / rkl), got {self.beta}")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size}")

    @classmethod
    def build(cls, options: dict) -> DivergenceOptions:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; choose from {known}")
        return cls(**options)


def check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown divergence {name!r}; choose from {list(NAMES)}")
    return name
