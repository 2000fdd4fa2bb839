"""In-memory ``/v1/files`` store: uploaded batch inputs and generated batch output/error files.

Memory is fine here: the simulator lives for one test session or one benchmark.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from hybrid_router.simulator.errors import not_found


@dataclass(slots=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


class FileStore:
    """Files by id, in creation order."""

    def __init__(self) -> None:
        self.files: dict[str, StoredFile] = {}

    def create(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        f = StoredFile(id="file-" + secrets.token_hex(12), filename=filename, purpose=purpose,
                       data=data)
        self.files[f.id] = f
        return f

    def get(self, file_id: str) -> StoredFile:
        f = self.files.get(file_id)
        if f is None:
            raise not_found(f"No such File object: {file_id}")
        return f

    def delete(self, file_id: str) -> dict[str, Any]:
        self.get(file_id)
        del self.files[file_id]
        return {"id": file_id, "object": "file", "deleted": True}

    def list(self, purpose: str | None, limit: int, after: str | None,
             order: str) -> dict[str, Any]:
        items = [f for f in self.files.values() if purpose is None or f.purpose == purpose]
        if order != "asc":
            items.reverse()
        return page([f.to_dict() for f in items], limit, after)


def page(items: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """An OpenAI cursor page (``after`` = id of the last item already seen)."""
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(items) > limit,
    }
