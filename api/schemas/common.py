"""Shapes shared by several resources (lists follow the OpenAI API: ``data`` + ``has_more``)."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
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


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


def unix(value: datetime | None) -> int | None:
    """Unix seconds, as the OpenAI API reports times."""
    return None if value is None else int(value.timestamp())
