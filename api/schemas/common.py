"""Shapes shared by several resources (lists follow the OpenAI API: ``data`` + ``has_more``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator

from api.core.unicode import replace_surrogates

T = TypeVar("T")

# The largest event id or step a query may name: they are INTEGER columns (api/db/models.py), 32-bit
# in PostgreSQL; a larger integer raised in the driver (a 500) before it was bounded here.
INT32_MAX = 2**31 - 1


class PublicModel(BaseModel):
    """Base of the response bodies, built from a database row with ``model_validate(row)``:
    times become Unix seconds (as the OpenAI API reports them), and text read back from the
    database is valid Unicode.

    Rows stored before input checks existed (api/core/input_checks.py) may hold lone surrogates;
    no JSON encoder takes them, so each page showing such a row was a 500.
    """

    model_config = ConfigDict(from_attributes=True)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if isinstance(value, datetime):
            return unix(value)
        return replace_surrogates(value)


class Page(PublicModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | int | None = None
    last_id: str | int | None = None

    @classmethod
    def of(cls, data: list[T], has_more: bool) -> Page[T]:
        """A page of items that carry an ``id``, with the first and last ids filled in."""
        ids = [item.id for item in data]  # type: ignore[attr-defined]
        return cls(
            data=data, has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None
        )


class Deleted(PublicModel):
    id: str
    object: str
    deleted: bool = True


def unix(value: datetime | None) -> int | None:
    """Unix seconds, as the OpenAI API reports times."""
    return None if value is None else int(value.timestamp())
