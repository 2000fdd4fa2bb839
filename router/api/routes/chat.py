"""Routes for chat (filled in by its lane)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
