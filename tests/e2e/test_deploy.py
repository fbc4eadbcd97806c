"""What can be checked of the Docker deployment without a Docker engine: the compose file's shape,
the Dockerfile's inputs, and that the API image's install (no torch) runs the API."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import yaml

from tests.worker import services

REPO = services.REPO
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
DOCKERFILE = (REPO / "Dockerfile").read_text()
WORKER_ONLY = {"torch", "transformers", "accelerate", "safetensors", "gguf", "rouge-score", "numpy"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def _extra(name: str) -> set[str]:
    """The package names an extra of pyproject.toml installs, self-references ([api]) expanded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {_name(d) for d in project["dependencies"]}
    for requirement in project["optional-dependencies"][name]:
        if _name(requirement) == project["name"]:
            for extra in requirement.split("[", 1)[1].rstrip("]").split(","):
                names |= _extra(extra.strip())
        else:
            names.add(_name(requirement))
    return names


def test_compose_services_healthchecks_and_order():
    services_ = COMPOSE["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services_)
    for name in ("postgres", "redis", "api", "worker"):
        assert services_[name]["healthcheck"]["test"], name
    assert services_["migrate"]["command"] == ["akl", "migrate"] and services_["migrate"]["restart"] == "no"
    assert services_["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services_[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        assert "data:/data" in services_[name]["volumes"]  # one artifact root for API and workers
    gpu = services_["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "-Q" in services_["worker-cpu"]["command"] and "cpu" in services_["worker-cpu"]["command"]
    assert set(COMPOSE["volumes"]) >= {"pgdata", "data"}


def test_compose_prometheus_profile_scrapes_the_unpublished_metrics_port():
    prometheus = COMPOSE["services"]["prometheus"]
    assert prometheus["profiles"] == ["metrics"]  # optional: not started by a plain `up`
    host_config, container_config = prometheus["volumes"][0].split(":")[:2]
    assert container_config == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((REPO / host_config).read_text())
    [job] = config["scrape_configs"]
    api = COMPOSE["services"]["api"]
    port = int(api["environment"]["AKL_METRICS_PORT"])
    assert job["dns_sd_configs"][0]["names"] == ["api"] and job["dns_sd_configs"][0]["port"] == port
    assert all(str(port) not in mapping for mapping in api["ports"])  # never published to tenants
    assert all(mapping.startswith("127.0.0.1:") for mapping in prometheus["ports"])


def test_compose_targets_exist_and_settings_validate_in_production():
    targets = set(re.findall(r"^FROM \S+ AS (\w+)", DOCKERFILE, flags=re.M))
    for name, service in COMPOSE["services"].items():
        if "build" in service:
            assert service["build"]["target"] in targets, name
    from api.core.config import Settings

    env = dict(COMPOSE["services"]["api"]["environment"])
    env["AKL_DATABASE_URL"] = re.sub(r"\$\{POSTGRES_PASSWORD:\?[^}]*\}", "secret", env["AKL_DATABASE_URL"])
    env["AKL_ALLOW_HUB"] = "false"
    settings = Settings(**{k.removeprefix("AKL_").lower(): v for k, v in env.items()})
    assert settings.environment == "production" and settings.broker_url.startswith("redis://")
    assert settings.metrics_port == 9100 and not settings.webhooks_allow_private


def test_compose_config_validates_when_docker_compose_is_installed(tmp_path: Path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed here")
    done = subprocess.run(
        [docker, "compose", "-f", str(REPO / "docker-compose.yml"), "config", "--quiet"],
        env={"POSTGRES_PASSWORD": "x", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_dockerfile_copies_what_exists_and_installs_like_ci():
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            sources = line.split()[1:-1]
            assert all((REPO / s).exists() or "[" in s for s in sources), sources  # globs may be empty
            assert any((REPO / s).exists() for s in sources), sources
    run_sh = (REPO / "run.sh").read_text()
    for step in ("install -q -r requirements/torch-cpu.txt", "-c requirements/torch-cpu.txt",
                 "--no-deps -r requirements/teacher.txt"):  # fmt: skip
        assert step in DOCKERFILE and step in run_sh, step


def test_api_extra_leaves_out_exactly_the_training_stack():
    api, worker = _extra("api"), _extra("worker")
    assert not api & WORKER_ONLY
    assert {"fastapi", "sqlalchemy", "celery", "psycopg", "alembic"} <= api
    assert worker - api == WORKER_ONLY  # the worker adds the training stack and nothing else
    assert _extra("all") == worker and _extra("all") <= _extra("dev")
    assert 'pip install ".[api]"' in DOCKERFILE and '".[worker]"' in DOCKERFILE


def test_the_api_and_the_cli_run_without_the_training_stack(tmp_path: Path):
    """What the API image can do: serve uploads and job submission with torch & co. unimportable."""
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {sorted(m.replace("-", "_") for m in WORKER_ONLY)!r}:
                    raise ImportError("blocked in the API image: " + name)

        sys.meta_path.insert(0, Block())
        from fastapi.testclient import TestClient
        from akl_cli.main import app as cli  # the `akl migrate` / `akl keys` entry point
        from api.core.config import Settings
        from api.crud import api_keys
        from api.db.session import get_engine, migrate, session_factory
        from api.main import create_app

        settings = Settings(data_root={str(tmp_path)!r})
        migrate(settings.database_url)
        with session_factory(get_engine(settings.database_url))() as s:
            _, key = api_keys.create_key(session=s, tenant_name="t")
            s.commit()
        client = TestClient(create_app(settings), headers={{"Authorization": "Bearer " + key.key}})
        line = b'{{"prompt": "Say hi", "response": "hi"}}\\n'
        up = client.post("/v1/files", files={{"file": ("t.jsonl", line * 3)}}, data={{"purpose": "train"}})
        assert up.status_code == 201, up.text
        job = client.post("/v1/jobs", json={{"teacher": "preset:tiny", "data": {{"train": up.json()["id"]}}}})
        assert job.status_code == 201 and job.json()["status"] == "queued", job.text
        print("API-OK", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "API-OK []" in done.stdout, done.stderr[-3000:]
