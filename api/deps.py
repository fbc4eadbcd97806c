"""FastAPI dependencies: settings, a database session, the broker client, the calling tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.crud import api_keys as api_keys_crud
from api.db.models import Tenant
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
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    unauthorized = HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="a valid API key is required: Authorization: Bearer <key>",
        headers={"WWW-Authenticate": "Bearer"},
    )
    if credentials is None:
        raise unauthorized
    tenant = api_keys_crud.authenticate(session=session, key=credentials.credentials)
    if tenant is None:
        raise unauthorized
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
