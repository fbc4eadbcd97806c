"""Submitting a job: the one path that the native ``POST /v1/jobs`` and OpenAI's
``POST /v1/fine_tuning/jobs`` share (``SubmitDep``), so both shapes make the same job rows.

Order of checks: an Idempotency-Key replay first (it answers with the job even if its files are
gone since), then size, references, work budget, and last the active-jobs limit: a 429 says
"later", which must not hide a 422 that no retry can fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import BackgroundTasks, Depends, Header, Response

from akl_core.spec import JobSpec
from api.core import quotas
from api.core.cache_refs import cache_id_of, resolve_cache_job
from api.core.errors import ApiError
from api.core.job_refs import RefError, resolve_spec
from api.core.progress import planned_steps
from api.crud import jobs as jobs_crud
from api.db.models import Job
from api.deps import CeleryDep, CurrentTenant, SessionDep, SettingsDep
from api.queue import enqueue_job, queue_for

IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=255, pattern=r"^[!-~]+$")]


def _conflict(exc: jobs_crud.IdempotencyConflict) -> ApiError:
    return ApiError(
        409,
        f"Idempotency-Key already used for job {exc.job.id} with a different request body",
        code="idempotency_key_reused",
    )


@dataclass
class Submission:
    tenant: CurrentTenant
    session: SessionDep
    settings: SettingsDep
    celery: CeleryDep
    background: BackgroundTasks
    response: Response
    idempotency_key: IdempotencyKey = None

    def submit(self, spec: JobSpec, metadata: dict[str, str] | None) -> Job:
        """Check, store and enqueue a job for ``spec``; raise ApiError (404, 409, 422, 429, ...)."""
        session, settings, tenant_id = self.session, self.settings, self.tenant.id
        spec_json = spec.model_dump(mode="json")
        try:
            if self.idempotency_key is not None:
                replayed = jobs_crud.find_replay(
                    session=session,
                    tenant_id=tenant_id,
                    key=self.idempotency_key,
                    spec=spec_json,
                    metadata=metadata,
                )
                if replayed is not None:
                    self.response.headers["Idempotent-Replayed"] = "true"
                    return replayed
            quotas.check_spec_size(spec_json, metadata, settings)
            if cache_id_of(spec.teacher) is not None:  # a stored teacher (README, "Teacher caches")
                resolved, _ = resolve_cache_job(spec, session=session, tenant_id=tenant_id, settings=settings)
            else:
                resolved = resolve_spec(spec, session=session, tenant_id=tenant_id, settings=settings)
            quotas.check_job_work(spec, session=session, tenant_id=tenant_id, settings=settings)
            quotas.check_active_jobs(session=session, tenant_id=tenant_id, settings=settings)
        except RefError as exc:
            raise ApiError(exc.status_code, f"{exc.field}: {exc.message}", param=exc.field) from None
        except quotas.QuotaError as exc:
            raise ApiError(exc.status_code, exc.message) from None
        except jobs_crud.IdempotencyConflict as exc:
            raise _conflict(exc) from None
        queue = queue_for(spec.resources.device, settings)
        assert settings.artifacts_root is not None
        try:
            job, created = jobs_crud.create_job(
                session=session,
                tenant_id=tenant_id,
                spec=spec_json,
                resolved_spec=resolved,
                metadata=metadata,
                queue=queue,
                artifacts_root=str(settings.artifacts_root.resolve()),
                idempotency_key=self.idempotency_key,
                total_steps=planned_steps(spec, session=session, tenant_id=tenant_id),
            )
        except jobs_crud.IdempotencyConflict as exc:
            raise _conflict(exc) from None
        if created:
            # After the response; if the broker is down the reconciler publishes it later.
            self.background.add_task(enqueue_job, self.celery, job_id=job.id, queue=queue)
        else:
            self.response.headers["Idempotent-Replayed"] = "true"
        return job


SubmitDep = Annotated[Submission, Depends(Submission)]
