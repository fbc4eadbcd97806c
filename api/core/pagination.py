"""Keyset pagination, newest first, shared by the files, jobs and teacher-cache lists.

A page is ordered by ``(created_at, id)`` descending; the cursor is the last row of the previous
page, so pages stay stable while rows are added (an offset would skip or repeat rows).
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from api.core.errors import ApiError

Row = TypeVar("Row")


def newest_first(
    session: Session, query: Select[Any], model: Any, *, after: Any | None, limit: int
) -> tuple[list[Any], bool]:
    """At most ``limit`` rows of ``query`` older than ``after``, and whether more follow."""
    if after is not None:
        query = query.where(
            (model.created_at < after.created_at)
            | ((model.created_at == after.created_at) & (model.id < after.id))
        )
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cursor_row(row: Row | None, after: str, noun: str) -> Row:
    """The row an ``after`` cursor names; 400 when it names none of the tenant's rows."""
    if row is None:
        raise ApiError(400, f"after: unknown {noun} {after!r}", param="after", code="invalid_cursor")
    return row
