from __future__ import annotations

from typing import Literal

from api.schemas.common import PublicModel

# "fine-tune" is OpenAI's purpose: such a file serves as training or validation data alike.
FilePurpose = Literal["train", "validation", "fine-tune"]


class FilePublic(PublicModel):
    """OpenAI's file object (``status`` is always processed: a file is validated on upload)."""

    object: Literal["file"] = "file"
    id: str
    filename: str
    purpose: FilePurpose
    bytes: int
    num_examples: int
    created_at: int
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
