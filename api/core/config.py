"""Service settings from the environment (prefix ``AKL_``); see docs/architecture.md#settings.

Derived paths (database, broker folders, models, artifacts, uploads) default to places under
``data_root`` so a bare ``akl serve`` works with no configuration at all.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AKL_", env_file=".env", extra="ignore")

    environment: Literal["local", "production"] = Field(
        "local", description="production refuses the embedded SQLite database and filesystem broker"
    )
    data_root: Path = Field(Path("./.akl"), description="root of everything the service stores")
    database_url: str = Field("", description="default: sqlite:///{data_root}/akl.db")
    broker_url: str = Field("", description="default: filesystem:// with folders under {data_root}/broker")
    models_root: Path | None = Field(None, description="default: {data_root}/models")
    artifacts_root: Path | None = Field(None, description="default: {data_root}/artifacts")
    files_root: Path | None = Field(None, description="uploaded JSONL files; default: {data_root}/files")
    caches_root: Path | None = Field(None, description="teacher caches; default: {data_root}/caches")
    allow_hub: bool = Field(False, description="allow hf:ORG/NAME model references")
    max_upload_bytes: int = Field(100 * MiB, ge=1, description="largest accepted upload")
    max_line_bytes: int = Field(1 * MiB, ge=1, description="largest accepted JSONL line")
    gpu_queue: str = "gpu"
    cpu_queue: str = "cpu"
    default_queue: str = Field("", description="queue of device=auto jobs; default: the gpu queue")
    enqueue_timeout_s: float = Field(3.0, gt=0, description="give up publishing after this long")
    gpu_workers: bool = Field(
        True, description="a CUDA worker serves the gpu queue; false refuses resources.device=cuda (422)"
    )
    # Per-tenant budgets (api/core/quotas.py), generous for one machine; see .env.example.
    max_active_jobs: int = Field(50, ge=1, description="queued plus running jobs per tenant (429)")
    max_train_tokens: int = Field(
        10**11, ge=1, description="per job: steps x batch x grad_accum x processes x max_length (422)"
    )
    max_eval_tokens: int = Field(
        10**9, ge=1, description="per job: evaluations x examples x seeds x max_new_tokens (422)"
    )
    max_stored_bytes: int = Field(10 * 1024 * MiB, ge=1, description="uploaded bytes per tenant (429)")
    max_spec_bytes: int = Field(64 * 1024, ge=1024, description="a job's spec and metadata as JSON (422)")
    max_list_bytes: int = Field(
        1 * MiB, ge=1024, description="a list page stops early (has_more) once its items pass this"
    )

    # Webhooks (api/webhooks/): the deliverer runs in every API process; the outbox is the database.
    max_webhooks: int = Field(20, ge=1, description="webhooks per tenant (429)")
    webhooks_deliver: bool = Field(True, description="run the webhook deliverer in this API process")
    webhooks_allow_private: bool = Field(
        False, description="allow loopback and private (RFC 1918, fc00::/7) webhook targets; tests only"
    )
    webhooks_timeout_s: float = Field(10.0, gt=0, le=60, description="per connect, read and write of a try")
    webhooks_max_attempts: int = Field(8, ge=1, le=50, description="tries of one delivery before it fails")
    webhooks_backoff_s: float = Field(5.0, gt=0, description="wait before the first retry; doubles after")
    webhooks_backoff_max_s: float = Field(3600.0, gt=0, description="longest wait between two tries")
    webhooks_poll_s: float = Field(1.0, gt=0, le=60, description="how often the deliverer looks for work")
    webhooks_concurrency: int = Field(4, ge=1, le=64, description="deliveries sent at once per API process")
    webhooks_lease_s: float = Field(
        0.0, ge=0, description="how long a claimed delivery stays one deliverer's; default 4 x timeout + 30 s"
    )
    # Prometheus (api/metrics.py): never served on the API's port.
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve Prometheus metrics on this port (unset: off)"
    )
    metrics_host: str = Field("127.0.0.1", description="address of the metrics server")

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        root = self.data_root
        if not self.database_url:
            self.database_url = f"sqlite:///{root / 'akl.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        self.models_root = self.models_root or root / "models"
        self.artifacts_root = self.artifacts_root or root / "artifacts"
        self.files_root = self.files_root or root / "files"
        # A try (connect, TLS, write, read) ends within 3 x the timeout (api/webhooks/sender.py);
        # the lease must outlast it, or a second deliverer could send the same event meanwhile.
        if not self.webhooks_lease_s:
            self.webhooks_lease_s = 4 * self.webhooks_timeout_s + 30
        if self.webhooks_lease_s <= 3 * self.webhooks_timeout_s:
            raise ValueError("AKL_WEBHOOKS_LEASE_S must be more than 3 x AKL_WEBHOOKS_TIMEOUT_S")
        self.caches_root = self.caches_root or root / "caches"
        if self.environment == "production":
            if self.database_url.startswith("sqlite"):
                raise ValueError("AKL_DATABASE_URL must point at PostgreSQL when AKL_ENVIRONMENT=production")
            if self.broker_url.startswith("filesystem"):
                raise ValueError("AKL_BROKER_URL must point at Redis when AKL_ENVIRONMENT=production")
        return self

    @property
    def broker_root(self) -> Path:
        """Folder of the filesystem broker (used only when broker_url is filesystem://)."""
        return self.data_root / "broker"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own ``Settings`` and override the dependency)."""
    return Settings()
