"""schemathesis against the service's own OpenAPI schema, in process (ASGI), with a valid key:
valid and invalid requests on every operation, bounded in examples; the service never answers
500 (a 4xx with a message for bad input, 503 only when a dependency is down)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from api.core.config import Settings  # noqa: E402
from api.crud import api_keys  # noqa: E402
from api.db.session import dispose_engines, get_engine, migrate, session_factory  # noqa: E402
from api.main import create_app  # noqa: E402

MAX_EXAMPLES = 25  # per operation; ~13 operations, well under a minute on a busy machine

_state: dict[str, str] = {}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "models" / "my-student").mkdir(parents=True)
    url = f"sqlite:///{root / 'akl.db'}"
    migrate(url)
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_root=root / "data",
        database_url=url,
        broker_url="filesystem://",
        models_root=root / "models",
        max_upload_bytes=64 * 1024,
        max_line_bytes=4096,
    )
    with session_factory(get_engine(url))() as session:
        _, new = api_keys.create_key(session=session, tenant_name="fuzz")
        session.commit()
    _state["key"] = new.key
    app = create_app(config)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    dispose_engines()
    assert not list(Path(root / "data").glob("**/*.tmp*"))  # no half-written upload left behind


@pytest.mark.integration
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_operation_answers_500(api_schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    headers = {"Authorization": f"Bearer {_state['key']}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    failures: dict[str, str] = {}
    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,  # the same examples on every run: a finding is reproducible
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        try:
            fuzz()
        except Unsatisfiable:  # no invalid request exists (e.g. /healthz takes no input)
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # collect every operation's finding, then fail once
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
