"""Writing a Batch API input file: one JSONL line per request, streamed to temp files.

Lines are assembled from the body JSON exactly as stored on the record (no decode/encode), and
written straight to disk, so memory stays flat however many lines a batch has. When the next
line would break `max_requests` or `max_bytes`, the current file is closed and a new one begun:
each file becomes one upstream batch of one endpoint and one model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson

CHAT_URL = "/v1/chat/completions"
_LINE_HEAD = b'{"custom_id":'
_LINE_MIDS: dict[str, bytes] = {}


def _line_mid(url: str) -> bytes:
    mid = _LINE_MIDS.get(url)
    if mid is None:
        mid = _LINE_MIDS[url] = b',"method":"POST","url":' + orjson.dumps(url) + b',"body":'
    return mid


def jsonl_line(custom_id: str, body_json: bytes, url: str = CHAT_URL) -> bytes:
    """One input line for the endpoint `url`; `body_json` is the request body already encoded
    as JSON."""
    return _LINE_HEAD + orjson.dumps(custom_id) + _line_mid(url) + body_json + b"}\n"


def line_size(custom_id: str, body_json: bytes, url: str = CHAT_URL) -> int:
    return len(jsonl_line(custom_id, body_json, url))


@dataclass
class JsonlPart:
    """One input file: its path, the ids in it (in order) and its size."""

    path: Path
    ids: list[str] = field(default_factory=list)
    size: int = 0

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _open_part(directory: str | None) -> tuple[JsonlPart, BinaryIO]:
    fd, name = tempfile.mkstemp(prefix="hr-batch-", suffix=".jsonl", dir=directory)
    return JsonlPart(Path(name)), os.fdopen(fd, "wb", buffering=1 << 20)


def write_parts(
    lines: Iterable[tuple[str, bytes]],
    max_requests: int,
    max_bytes: int,
    directory: str | None = None,
    url: str = CHAT_URL,
) -> Generator[JsonlPart, None, None]:
    """Write `(custom_id, body_json)` pairs into files within the limits; yield each full file.

    The caller keeps lines longer than `max_bytes` out (see `line_size`): no batch can hold them.
    A consumer that stops early must remove the files it did not take.
    """
    part: JsonlPart | None = None
    out: BinaryIO | None = None
    try:
        for custom_id, body_json in lines:
            line = jsonl_line(custom_id, body_json, url)
            if part is not None and out is not None and (
                len(part.ids) >= max_requests or part.size + len(line) > max_bytes
            ):
                out.close()
                out = None
                yield part
                part = None
            if part is None:
                part, out = _open_part(directory)
            assert out is not None
            out.write(line)
            part.ids.append(custom_id)
            part.size += len(line)
        if part is not None and out is not None:
            out.close()
            out = None
            yield part
    finally:
        if out is not None:  # stopped half-way through a part: it will never be sent
            out.close()
            if part is not None:
                part.remove()
