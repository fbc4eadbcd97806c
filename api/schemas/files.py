from __future__ import annotations

from typing import Literal

from api.db.models import File
from api.schemas.common import PublicModel, unix

FilePurpose = Literal["train", "validation"]


class FilePublic(PublicModel):
    object: Literal["file"] = "file"
    id: str
    filename: str
    purpose: FilePurpose
    bytes: int
    num_examples: int
    created_at: int

    @classmethod
    def from_row(cls, row: File) -> FilePublic:
        return cls(
            id=row.id,
            filename=row.filename,
            purpose=row.purpose,  # type: ignore[arg-type]
            bytes=row.bytes,
            num_examples=row.num_examples,
            created_at=unix(row.created_at) or 0,
        )
