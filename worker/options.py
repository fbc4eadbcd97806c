"""Worker timings and limits, from the environment (prefix ``AKL_WORKER_``).

Kept apart from ``api.core.config.Settings`` because only worker processes read them; the
defaults follow the reliability design (docs/architecture.md): a ~30 s lease renewed
every tick (~2 s) by the transaction that also records the run's events (worker/tick.py).
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AKL_WORKER_", extra="ignore")

    lease_s: float = Field(30.0, gt=0, description="a job's lease lasts this long without a heartbeat")
    tick_s: float = Field(
        2.0, gt=0, description="write new events, renew the lease and read cancel_requested this often"
    )
    flush_max_events: int = Field(200, ge=1, description="... or as soon as this many events are read")
    term_grace_s: float = Field(10.0, gt=0, description="SIGTERM -> SIGKILL delay when stopping a run")
    max_attempts: int = Field(3, ge=1, description="a job claimed more often than this fails")
    reconcile_every_s: float = Field(20.0, gt=0, description="period of the reconciler loop")
    runner_module: str = Field("akl_core.runner", description="python -m MODULE SPEC.json OUTPUT_DIR")
    cache_runner_module: str = Field(
        "akl_core.cache_runner", description="python -m MODULE SPEC.json CACHE_DIR (teacher cache builds)"
    )
    requeue_after_s: float = Field(
        300.0, gt=0, description="re-enqueue a queued job not picked up for this long"
    )

    @model_validator(mode="after")
    def _tick_within_lease(self) -> WorkerOptions:
        if self.tick_s * 2 > self.lease_s:
            raise ValueError("AKL_WORKER_TICK_S must be at most half of AKL_WORKER_LEASE_S")
        return self
