"""Webhooks: register (the secret made here), list, get, delete, and their delivery tries."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from api.db.models import Webhook, WebhookAttempt

SECRET_BYTES = 32  # Standard Webhooks: between 24 and 64 random bytes, base64, prefixed whsec_


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def count_webhooks(*, session: Session, tenant_id: int) -> int:
    return (
        session.scalar(select(func.count()).select_from(Webhook).where(Webhook.tenant_id == tenant_id)) or 0
    )


def create_webhook(*, session: Session, tenant_id: int, url: str, events: Sequence[str]) -> Webhook:
    """Add (not commit) a webhook with a new secret."""
    row = Webhook(tenant_id=tenant_id, url=url, events=list(events), secret=new_secret())
    session.add(row)
    return row


def list_webhooks(*, session: Session, tenant_id: int) -> list[Webhook]:
    """The tenant's webhooks, newest first (at most AKL_MAX_WEBHOOKS of them)."""
    query = select(Webhook).where(Webhook.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(Webhook.created_at.desc(), Webhook.id.desc())))


def get_webhook(*, session: Session, tenant_id: int, webhook_id: str) -> Webhook | None:
    """The tenant's webhook, or None (another tenant's is None too)."""
    row = session.get(Webhook, webhook_id)
    return row if row is not None and row.tenant_id == tenant_id else None


def delete_webhook(*, session: Session, row: Webhook) -> None:
    """Delete (not commit) the webhook; its pending deliveries and tries go with it (ON DELETE CASCADE)."""
    session.execute(delete(Webhook).where(Webhook.id == row.id))


def list_attempts(
    *, session: Session, webhook_id: str, after: int | None = None, limit: int = 20
) -> tuple[list[WebhookAttempt], bool]:
    """Tries of the webhook's deliveries, newest first; ``after`` is the last id of the previous page."""
    query = select(WebhookAttempt).where(WebhookAttempt.webhook_id == webhook_id)
    if after is not None:
        query = query.where(WebhookAttempt.id < after)
    rows = list(session.scalars(query.order_by(WebhookAttempt.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
