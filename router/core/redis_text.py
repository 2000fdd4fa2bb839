"""Values as redis-py returns them (bytes, or str from a decoding client), as str.

One helper for every module that reads raw replies, instead of a private copy in each.
"""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    """`value` as str: bytes decoded as UTF-8, anything else through `str`."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_or_none(value: Any) -> str | None:
    """`text`, keeping None (a missing field or key) as None."""
    return None if value is None else text(value)
