"""Benchmark of the upstream simulator: streamed chunks per second.

Why: router benchmarks must measure the router, so the simulator has to out-run it by a wide
margin. This starts the simulator as a subprocess, drives many concurrent streaming chat
completions with a minimal asyncio HTTP/1.1 client (keep-alive, chunked decoding, no JSON
parsing: it counts SSE events), and reports wall-clock chunks/s plus chunks per CPU-second of
the simulator process (the "one core" number).

    python -m bench.bench_simulator            # full run
    python -m bench.bench_simulator --quick    # smoke size
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from hybrid_router.simulator.testing import free_port, simulator_env, wait_ready

OUT = Path(__file__).resolve().parent / "out" / "simulator.json"


@dataclass
class Scenario:
    name: str
    streams: int
    concurrency: int
    tokens: int
    tps: float = 0.0


@dataclass
class Result:
    name: str
    streams: int
    concurrency: int
    tokens_per_stream: int
    tps: float
    chunks: int
    seconds: float
    chunks_per_s: float
    sim_cpu_s: float
    chunks_per_cpu_s: float


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux); 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _request(host: str, port: int, tokens: int, tps: float, n: int) -> bytes:
    directive = f"[[sim:tokens={tokens}" + (f",tps={tps:g}" if tps > 0 else "") + "]]"
    body = orjson.dumps({
        "model": "gpt-4o-mini", "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"bench {n % 50} {directive}"}],
    })
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Authorization: Bearer sk-bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_stream(reader: asyncio.StreamReader) -> int:
    """Read one chunked SSE response; return the number of SSE events in it."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response: {head[:100]!r}")
    events = 0
    tail = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return events
        data = await reader.readexactly(size + 2)
        joined = tail + data[:-2]
        events += joined.count(b"\n\n")
        tail = joined[-1:]  # an event separator can straddle two HTTP chunks


async def _worker(host: str, port: int, sc: Scenario, queue: asyncio.Queue[int]) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    total = 0
    try:
        while True:
            try:
                n = queue.get_nowait()
            except asyncio.QueueEmpty:
                return total
            writer.write(_request(host, port, sc.tokens, sc.tps, n))
            total += await _read_stream(reader)
    finally:
        writer.close()


async def _run(host: str, port: int, sc: Scenario) -> tuple[int, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(sc.streams):
        queue.put_nowait(i)
    start = time.perf_counter()
    counts = await asyncio.gather(*[_worker(host, port, sc, queue)
                                    for _ in range(sc.concurrency)])
    return sum(counts), time.perf_counter() - start


def scenarios(quick: bool) -> list[Scenario]:
    if quick:
        return [
            Scenario("burst", streams=200, concurrency=16, tokens=100),
            Scenario("paced tps=200", streams=20, concurrency=20, tokens=40, tps=200),
        ]
    return [
        Scenario("burst c=64", streams=4000, concurrency=64, tokens=200),
        Scenario("burst c=256", streams=4000, concurrency=256, tokens=200),
        Scenario("single stream c=1", streams=300, concurrency=1, tokens=200),
        Scenario("short answers c=64", streams=6000, concurrency=64, tokens=30),
        Scenario("paced tps=100 c=300", streams=300, concurrency=300, tokens=100, tps=100),
    ]


def run(quick: bool, host: str = "127.0.0.1") -> list[Result]:
    port = free_port(host)
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--host", host, "--port", str(port)],
        env=simulator_env({}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    results: list[Result] = []
    try:
        wait_ready(f"http://{host}:{port}/v1", proc, 20.0)
        asyncio.run(_run(host, port, Scenario("warmup", 50, 8, 50)))
        for sc in scenarios(quick):
            cpu0 = _cpu_seconds(proc.pid)
            chunks, secs = asyncio.run(_run(host, port, sc))
            cpu = _cpu_seconds(proc.pid) - cpu0
            results.append(Result(
                name=sc.name, streams=sc.streams, concurrency=sc.concurrency,
                tokens_per_stream=sc.tokens, tps=sc.tps, chunks=chunks, seconds=round(secs, 3),
                chunks_per_s=round(chunks / secs), sim_cpu_s=round(cpu, 3),
                chunks_per_cpu_s=round(chunks / cpu) if cpu > 0 else 0,
            ))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return results


def table(results: list[Result]) -> str:
    cols = ("scenario", "streams", "conc", "tok/stream", "tps", "chunks", "secs", "chunks/s",
            "sim cpu s", "chunks/cpu-s")
    rows = [(r.name, r.streams, r.concurrency, r.tokens_per_stream, f"{r.tps:g}", r.chunks,
             f"{r.seconds:.2f}", f"{r.chunks_per_s:,.0f}", f"{r.sim_cpu_s:.2f}",
             f"{r.chunks_per_cpu_s:,.0f}") for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=True)]
    lines = ["  ".join(str(v).rjust(w) for v, w in zip(row, widths, strict=True))
             for row in (cols, *rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny smoke-sized run")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the JSON result")
    args = parser.parse_args()
    results = run(args.quick)
    sys.stdout.write(table(results) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps({
        "benchmark": "simulator", "quick": args.quick, "python": sys.version.split()[0],
        "results": [asdict(r) for r in results],
    }, option=orjson.OPT_INDENT_2))
    sys.stdout.write(f"wrote {args.out}\n")


if __name__ == "__main__":
    main()
