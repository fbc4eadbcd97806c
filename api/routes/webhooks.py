"""Webhooks: register (the secret is shown once), list, get, delete, and each one's delivery tries."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from api.core.errors import error_responses
from api.crud import webhooks as webhooks_crud
from api.db.models import Webhook
from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.schemas.common import INT32_MAX, Deleted, Page
from api.schemas.webhooks import WebhookAttemptPublic, WebhookCreate, WebhookCreated, WebhookPublic
from api.webhooks.addresses import AddressRefused, check

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


def _get_or_404(session: SessionDep, tenant: CurrentTenant, webhook_id: str) -> Webhook:
    row = webhooks_crud.get_webhook(session=session, tenant_id=tenant.id, webhook_id=webhook_id)
    if row is None:
        raise HTTPException(404, f"webhook {webhook_id!r} not found")
    return row


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(413, 429, s429="the tenant has AKL_MAX_WEBHOOKS webhooks already"),
)
def create_webhook(
    body: WebhookCreate, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep
) -> WebhookCreated:
    """Register a URL for job events; the answer holds the signing secret, shown only this once."""
    try:
        check(body.url, allow_private=settings.webhooks_allow_private)
    except AddressRefused as exc:
        issue = {"type": "url_refused", "loc": ("body", "url"), "msg": str(exc), "input": body.url}
        raise RequestValidationError([issue]) from None
    if webhooks_crud.count_webhooks(session=session, tenant_id=tenant.id) >= settings.max_webhooks:
        raise HTTPException(429, f"at most {settings.max_webhooks} webhooks per tenant; delete one first")
    row = webhooks_crud.create_webhook(session=session, tenant_id=tenant.id, url=body.url, events=body.events)
    session.commit()
    return WebhookCreated(**WebhookPublic.from_row(row).model_dump(), secret=row.secret)


@router.get("")
def list_webhooks(tenant: CurrentTenant, session: SessionDep) -> Page[WebhookPublic]:
    """List this tenant's webhooks, newest first (secrets are never shown again)."""
    rows = webhooks_crud.list_webhooks(session=session, tenant_id=tenant.id)
    return Page[WebhookPublic].of([WebhookPublic.from_row(row) for row in rows], has_more=False)


@router.get("/{webhook_id}", responses=error_responses(404))
def get_webhook(webhook_id: str, tenant: CurrentTenant, session: SessionDep) -> WebhookPublic:
    """Get one webhook."""
    return WebhookPublic.from_row(_get_or_404(session, tenant, webhook_id))


@router.delete("/{webhook_id}", responses=error_responses(404))
def delete_webhook(webhook_id: str, tenant: CurrentTenant, session: SessionDep) -> Deleted:
    """Delete a webhook; its deliveries not yet made are dropped."""
    row = _get_or_404(session, tenant, webhook_id)
    webhooks_crud.delete_webhook(session=session, row=row)
    session.commit()
    return Deleted(id=webhook_id, object="webhook")


@router.get("/{webhook_id}/attempts", responses=error_responses(404))
def list_attempts(
    webhook_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    after: int | None = Query(
        None, ge=0, le=INT32_MAX, description="the last attempt id of the previous page"
    ),
    limit: int = Query(20, ge=1, le=100),
) -> Page[WebhookAttemptPublic]:
    """Delivery tries of this webhook, newest first: status, the receiver's response code, time."""
    row = _get_or_404(session, tenant, webhook_id)
    rows, has_more = webhooks_crud.list_attempts(session=session, webhook_id=row.id, after=after, limit=limit)
    return Page[WebhookAttemptPublic].of([WebhookAttemptPublic.from_row(r) for r in rows], has_more)
