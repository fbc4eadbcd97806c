"""Webhook bodies: registration, the public view (the secret only in the creation answer), tries."""

from __future__ import annotations

from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.db.models import Webhook, WebhookAttempt
from api.schemas.common import PublicModel, unix
from api.webhooks.addresses import MAX_URL_CHARS
from api.webhooks.outbox import EVENT_TYPES

# The same names as api.webhooks.outbox.EVENT_TYPES (tests/api/test_webhooks.py ties them).
EventType = Literal[
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "teacher_cache.succeeded",
    "teacher_cache.failed",
    "teacher_cache.cancelled",
]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="https:// (or http://) URL on a public address; redirects are not followed",
        examples=["https://example.com/hooks/akl"],
    )
    events: list[EventType] = Field(
        default_factory=lambda: cast(list[EventType], list(EVENT_TYPES)),
        min_length=1,
        max_length=16,
        description="event types to deliver (default: all of them)",
    )

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class WebhookPublic(PublicModel):
    object: Literal["webhook"] = "webhook"
    id: str
    url: str
    events: list[str]
    created_at: int

    @classmethod
    def from_row(cls, row: Webhook) -> WebhookPublic:
        return cls(id=row.id, url=row.url, events=list(row.events), created_at=unix(row.created_at) or 0)


class WebhookCreated(WebhookPublic):
    secret: str = Field(
        description="whsec_...: verifies the webhook-signature header (Standard Webhooks); shown only now"
    )


class WebhookAttemptPublic(PublicModel):
    object: Literal["webhook.attempt"] = "webhook.attempt"
    id: int
    message_id: str = Field(description="the webhook-id header: the same on every try of one event")
    event: str
    attempt: int = Field(description="1 for the first try of this message")
    status: Literal["succeeded", "failed"]
    response_status_code: int | None = Field(description="the receiver's HTTP status; null if none came")
    error: str | None
    duration_ms: int
    created_at: int

    @classmethod
    def from_row(cls, row: WebhookAttempt) -> WebhookAttemptPublic:
        return cls(
            id=row.id,
            message_id=row.delivery_id,
            event=row.event_type,
            attempt=row.attempt,
            status="succeeded" if row.succeeded else "failed",
            response_status_code=row.status_code,
            error=row.error,
            duration_ms=row.duration_ms,
            created_at=unix(row.created_at) or 0,
        )
