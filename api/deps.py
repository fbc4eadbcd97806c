"""FastAPI dependencies: settings, a database session, the broker client, the calling tenant, and
the tenant's job or file named in the path (404 otherwise, another tenant's too)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.core.auth import TENANT_STATE, UNAUTHORIZED
from api.core.config import Settings
from api.core.errors import ApiError
from api.crud import api_keys as api_keys_crud
from api.crud import files as files_crud
from api.crud import jobs as jobs_crud
from api.db.models import File, Job, Tenant
from api.db.session import get_engine, session_factory


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    with session_factory(get_engine(settings.database_url))() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


CeleryDep = Annotated[Celery, Depends(get_celery)]

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer akl-<prefix>-<secret>")


def get_current_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The key's tenant; api/core/auth.py has usually checked the key already and left its id."""
    unauthorized = HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED, detail=UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"}
    )
    tenant_id = getattr(request.state, TENANT_STATE, None)
    if tenant_id is not None:
        tenant = session.get(Tenant, tenant_id)
    elif credentials is None:
        raise unauthorized
    else:
        tenant = api_keys_crud.authenticate(session=session, key=credentials.credentials)
    if tenant is None:
        raise unauthorized
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


def get_job(job_id: Annotated[str, Path()], tenant: CurrentTenant, session: SessionDep) -> Job:
    job = jobs_crud.get_job(session=session, tenant_id=tenant.id, job_id=job_id)
    if job is None:
        raise ApiError(404, f"job {job_id!r} not found", param="job_id", code="job_not_found")
    return job


JobDep = Annotated[Job, Depends(get_job)]


def get_file(file_id: Annotated[str, Path()], tenant: CurrentTenant, session: SessionDep) -> File:
    row = files_crud.get_file(session=session, tenant_id=tenant.id, file_id=file_id)
    if row is None:
        raise ApiError(404, f"file {file_id!r} not found", param="file_id", code="file_not_found")
    return row


FileDep = Annotated[File, Depends(get_file)]
