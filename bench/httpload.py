"""A small, fast HTTP/1.1 keep-alive load generator on raw asyncio streams.

httpx spends more CPU per request than the server under test, which would make the benchmark
measure the client. This speaks just enough HTTP/1.1 (Content-Length bodies, keep-alive) to
drive the intake API at saturation, or at a fixed rate for latency at partial load.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    # Paced runs: how late the generator woke for a request's slot (a request still waiting for
    # its previous answer is the server's delay, not counted). Large values would mean that the
    # generator itself, sharing the cores with the server, could not keep its schedule.
    slips_s: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0  # CPU time of this process during the run (the generator's cost)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0


def build_request(url: str, method: str, body: bytes | None, headers: dict[str, str]) -> bytes:
    parsed = urlparse(url)
    path = parsed.path or "/"
    if parsed.query:
        path += "?" + parsed.query
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parsed.netloc}", "Connection: keep-alive"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:].strip())
            break
    if length:
        await reader.readexactly(length)
    return status


async def run_load(
    url: str,
    *,
    method: str = "POST",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    connections: int = 32,
    duration_s: float = 5.0,
    rate_per_s: float | None = None,
    ok_statuses: tuple[int, ...] = (200, 202),
) -> LoadResult:
    """Closed loop over `connections` keep-alive connections, or paced at `rate_per_s` total."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    payload = build_request(url, method, body, headers or {})
    result = LoadResult()
    cpu_start = time.process_time()
    start = time.perf_counter()
    deadline = start + duration_s
    interval = connections / rate_per_s if rate_per_s else 0.0

    async def worker(index: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        next_at = start + (interval * index / connections if interval else 0.0)
        try:
            while True:
                now = time.perf_counter()
                if now >= deadline:
                    return
                slept = False
                if interval:
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                        slept = True
                    next_at += interval
                t0 = time.perf_counter()
                if slept:
                    result.slips_s.append(max(0.0, t0 - (next_at - interval)))
                writer.write(payload)
                result.sent += 1
                try:
                    status = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    result.errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                result.status_counts[status] = result.status_counts.get(status, 0) + 1
                if status in ok_statuses:
                    result.ok += 1
                    result.latencies_s.append(time.perf_counter() - t0)
                else:
                    result.errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
    result.elapsed_s = time.perf_counter() - start
    result.client_cpu_s = time.process_time() - cpu_start
    return result
