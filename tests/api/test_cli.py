"""`akl keys create|list|revoke` and `akl migrate`, and the settings they read."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.cli import register
from api.core.config import Settings
from api.core.security import generate_key, hash_key, key_prefix, verify_key
from api.main import create_app


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, settings: Settings, tmp_path: Path) -> typer.Typer:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AKL_DATA_ROOT", str(settings.data_root))
    monkeypatch.setenv("AKL_DATABASE_URL", settings.database_url)
    app = typer.Typer()
    register(app)
    return app


def test_keys_create_list_revoke(cli: typer.Typer, settings: Settings) -> None:
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "--tenant", "acme"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    prefix = key_prefix(key)
    assert prefix is not None
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/jobs", headers=auth).status_code == 200
        listed = runner.invoke(cli, ["keys", "list"])
        assert listed.exit_code == 0 and prefix in listed.stdout and "acme" in listed.stdout
        assert key.split("-", 2)[2] not in listed.stdout  # the secret is never shown again
        revoked = runner.invoke(cli, ["keys", "revoke", prefix])
        assert revoked.exit_code == 0, revoked.output
        assert client.get("/v1/jobs", headers=auth).status_code == 401
    assert runner.invoke(cli, ["keys", "revoke", "ffffffffffff"]).exit_code == 1
    assert runner.invoke(cli, ["keys", "create", "--tenant", " "]).exit_code != 0


def test_migrate_command(cli: typer.Typer) -> None:
    result = CliRunner().invoke(cli, ["migrate"])
    assert result.exit_code == 0 and "newest schema" in result.stdout


def test_keys_are_random_and_only_their_hash_verifies() -> None:
    first, second = generate_key(), generate_key()
    assert first.key != second.key and first.prefix != second.prefix
    assert first.key.startswith(f"akl-{first.prefix}-") and len(first.key) > 50
    assert first.key_hash == hash_key(first.key) and first.key not in first.key_hash
    assert verify_key(first.key, first.key_hash) and not verify_key(second.key, first.key_hash)
    assert key_prefix("akl-short-x") is None and key_prefix("bearer") is None


def test_settings_defaults_derive_from_the_data_root(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_root=tmp_path)  # type: ignore[call-arg]
    assert settings.database_url == f"sqlite:///{tmp_path / 'akl.db'}"
    assert settings.broker_url == "filesystem://"
    assert (settings.models_root, settings.artifacts_root) == (tmp_path / "models", tmp_path / "artifacts")
    assert settings.max_upload_bytes == 100 * 1024 * 1024


def test_settings_from_the_environment_and_production_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AKL_ALLOW_HUB", "true")
    monkeypatch.setenv("AKL_MAX_UPLOAD_BYTES", "1234")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.allow_hub is True and settings.max_upload_bytes == 1234
    monkeypatch.setenv("AKL_ENVIRONMENT", "production")
    with pytest.raises(ValueError, match="PostgreSQL"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("AKL_DATABASE_URL", "postgresql+psycopg://db/akl")
    with pytest.raises(ValueError, match="Redis"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("AKL_BROKER_URL", "redis://broker:6379/0")
    assert Settings(_env_file=None).environment == "production"  # type: ignore[call-arg]
