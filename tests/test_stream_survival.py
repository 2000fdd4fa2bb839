"""A stream outlives its worker and a Redis blip: real API and stream worker processes, a real
Redis (a private one where it is restarted), the simulator, and subscribers on every route (SSE,
raw pub/sub with the replay log, the OpenAI drop-in through the official SDK).

What a user checks: every request ends in exactly one terminal state; each subscriber's text is
exactly the upstream's answer (the simulator is deterministic), in one gapless, duplicate-free
sequence; the ledger holds what was paid.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.router.core.subscribe import follow_events
from hybrid_router.settings import Settings
from hybrid_router.workers.stream.context import StreamContext
from tests.support import Stack, start_redis_server, wait_until
from tests.test_stream_lane import AUTH, KEY_A, MODEL, direct_answer, lane_settings, sse, token_text

FINAL = ("done", "error", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")


def prompt(directive: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"Survive {uuid.uuid4().hex} {directive}"}]


class Collector(threading.Thread):
    """Runs one subscriber in a thread and keeps what it received (or the error it hit)."""

    def __init__(self, read: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._read = read
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._read()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def value(self, timeout: float) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "subscriber still waiting"
        if self.error is not None:
            raise self.error
        return self.result


def answers(sim_url: str, prompts: list[list[dict[str, Any]]]) -> list[str]:
    """The upstream's answer to each prompt, asked directly (at once: each takes as long as
    its slow stream)."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda msgs: direct_answer(sim_url, msgs), prompts))


def submit(http: httpx.Client, msgs: list[dict[str, Any]]) -> str:
    r = http.post("/v1/requests", json={"model": MODEL, "messages": msgs, "priority": "high"})
    assert r.status_code == 202, r.text
    request_id: str = r.json()["id"]
    return request_id


def assert_gapless(events: list[dict[str, Any]], expected: str) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert token_text(events) == expected
    assert [e["type"] for e in events].count("done") == 1 and events[-1]["type"] == "done"


def drop_in_stream(api: str, msgs: list[dict[str, Any]]) -> tuple[str, str | None]:
    client = openai.OpenAI(base_url=f"{api}/v1", api_key=KEY_A, max_retries=0, timeout=120)
    text, finish = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, stream=True,  # type: ignore[arg-type]
                                                extra_headers={"X-Priority": "high"}):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish


def test_streams_survive_the_death_of_every_stream_worker(
        redis_base_url: str, sim_url: str) -> None:
    """Both stream workers are SIGKILLed mid-stream, then one is started: every stream goes on
    from its last published token, and every kind of subscriber sees the upstream's exact text,
    once. The ledger counts each stream's tokens once."""
    settings = lane_settings(redis_base_url, sim_url, stream_lease_s=2.0,
                             stream_worker_concurrency=16)
    ctx = StreamContext.build(settings)
    with Stack(settings) as stack:
        api = stack.start_api(timeout=60)
        workers = [stack.start_worker("stream", timeout=60) for _ in range(2)]
        directive = "[[sim:tps=15,tokens=60]]"
        with httpx.Client(base_url=api, headers=AUTH, timeout=120) as http:
            prompts = [prompt(directive) for _ in range(6)]
            ids = [submit(http, msgs) for msgs in prompts]
            sse_readers = [Collector(lambda rid=rid: sse(http, rid)[0]) for rid in ids]
            raw_reader = Collector(lambda: list(follow_events(ctx.redis, settings, ids[0],
                                                              timeout=120)))
            drop_in_prompts = [prompt(directive) for _ in range(2)]
            drop_ins = [Collector(lambda m=m: drop_in_stream(api, m)) for m in drop_in_prompts]
            for reader in (*sse_readers, raw_reader, *drop_ins):
                reader.start()
            wait_until(lambda: all(len(token_text(ctx.store.events_after(rid))) > 20
                                   for rid in ids), 20, message="every stream under way")
            for worker in workers:
                worker.kill()
            stack.start_worker("stream", timeout=60)

            expected = answers(sim_url, [*prompts, *drop_in_prompts])
            for answer, request_id, reader in zip(expected[:len(ids)], ids, sse_readers,
                                                  strict=True):
                assert_gapless(reader.value(60), answer)
                record = http.get(f"/v1/requests/{request_id}").json()
                assert record["status"] == "completed", record
                assert record["result"]["content"] == answer
                assert record["usage"]["completion_tokens"] == 60
                assert record["attempts"] == 2  # claimed once, taken over once
            assert_gapless(raw_reader.value(30), expected[0])
            for answer, reader in zip(expected[len(prompts):], drop_ins, strict=True):
                assert reader.value(30) == (answer, "stop")

        keys = Keys(settings.key_prefix)
        ledger = Ledger.from_hash(ctx.redis.hgetall(keys.ledger()))
        assert ledger.total("stream").completion_tokens == 60 * 8
        assert ctx.redis.zcard(keys.streaming()) == 0
    ctx.close()


def test_a_worker_killed_between_taking_and_claiming_delays_the_request_less_than_the_lease(
        redis_base_url: str, sim_url: str) -> None:
    """A stream worker that took a message off the queue is SIGKILLed before it claimed it
    (a stall injected in that window), three times over: each time another worker starts the
    request within `ROUTER_STREAM_LEASE_S` of the kill, not after the 60 s redispatch."""
    lease_s = 4.0  # heartbeats last 2 s: a taken message goes back within ~3 s
    settings = lane_settings(redis_base_url, sim_url, stream_lease_s=lease_s,
                             stream_redispatch_after_s=600)
    ctx = StreamContext.build(settings)
    keys = Keys(settings.key_prefix)
    stall = {"ROUTER_FAULT_STALL_AFTER_TAKE_S": "60"}
    with Stack(settings) as stack:
        api = stack.start_api(timeout=60)
        with httpx.Client(base_url=api, headers=AUTH, timeout=30) as http:
            for _ in range(3):
                taker = stack.start_worker("stream", timeout=60, extra_env=stall)
                request_id = submit(http, prompt("[[sim:tokens=5]]"))

                def taken(rid: str = request_id) -> bool:
                    return any(rid.encode() in m for k in ctx.redis.scan_iter(
                        f"{keys.prefix}:stream:taken:*") for m in ctx.redis.lrange(k, 0, -1))

                wait_until(taken, 10, message="message taken and not claimed")
                rescuer = stack.start_worker("stream", timeout=60)
                assert http.get(f"/v1/requests/{request_id}").json()["status"] == "dispatched"
                killed_at = time.time()
                taker.kill()
                record = wait_until(
                    lambda rid=request_id: (r := http.get(f"/v1/requests/{rid}").json())[
                        "status"] == "completed" and r, 30, message="request completed")
                assert record["started_at"] - killed_at <= lease_s
                rescuer.stop()
    ctx.close()


# --- Redis blips -------------------------------------------------------------------------------

class BlipStack:
    """A private append-only Redis that can be stopped and started again on the same port and
    files, with an API and a stream worker on it that live through every restart."""

    def __init__(self, workdir: Path, sim_url: str, make_settings: Callable[..., Settings]) -> None:
        self.workdir = workdir
        self.redis, url = start_redis_server(workdir, appendonly=True)
        self.port = int(url.rsplit(":", 1)[1])
        self.settings = make_settings(
            redis_url=f"{url}/0", upstream_base_url=sim_url, api_keys={KEY_A: "tenant-a"},
            retry_backoff_base_s=0.05, retry_backoff_max_s=0.5, sse_keepalive_s=1.0)
        self.stack = Stack(self.settings)
        self.api = self.stack.start_api(timeout=60)
        self.worker = self.stack.start_worker("stream", timeout=60)
        self.ctx = StreamContext.build(self.settings)

    def restart_redis(self, outage_s: float) -> None:
        """SIGTERM Redis (it writes its append-only file), and start it again `outage_s` later."""
        self.redis.stop()
        time.sleep(outage_s)  # the outage itself: what the test is about
        self.redis, _ = start_redis_server(self.workdir, appendonly=True, port=self.port)

    def close(self) -> None:
        self.ctx.close()
        self.stack.__exit__()
        self.redis.stop()


def blip_trial(blips: BlipStack, sim_url: str, streams: int, outage_s: float) -> dict[str, int]:
    """`streams` live streams, each with an SSE subscriber; Redis is stopped about a second
    into them and started again `outage_s` later. Checks every request's one terminal state and
    what its subscriber saw; returns the statuses counted."""
    store = blips.ctx.store
    with httpx.Client(base_url=blips.api, headers=AUTH, timeout=120) as http:
        prompts = [prompt("[[sim:tps=20,tokens=80]]") for _ in range(streams)]
        ids = [submit(http, msgs) for msgs in prompts]
        readers = [Collector(lambda rid=rid: sse(http, rid)[0]) for rid in ids]
        for reader in readers:
            reader.start()
        wait_until(lambda: all(token_text(store.events_after(rid)) for rid in ids), 30,
                   message="streams under way")
        time.sleep(1.0)  # let the streams run before the outage (part of the scenario)
        blips.restart_redis(outage_s)
        back_at = time.monotonic()

        def all_terminal() -> bool:
            return all((r := store.get(rid)) is not None and r.status in TERMINAL for rid in ids)

        wait_until(all_terminal, 60, message="every request terminal within 60 s")
        print(f"outage {outage_s:.1f}s: all terminal {time.monotonic() - back_at:.1f}s after "
              "Redis was back")
        statuses: dict[str, int] = {}
        expected = answers(sim_url, prompts)
        for answer, request_id, reader in zip(expected, ids, readers, strict=True):
            record = store.get(request_id)
            assert record is not None
            statuses[record.status] = statuses.get(record.status, 0) + 1
            log = store.events_after(request_id)
            finals = [e for e in log if e["type"] in FINAL]
            assert len(finals) == 1, (request_id, finals)
            assert {"completed": "done", "failed": "error"}[record.status] == finals[0]["type"]
            assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
            assert reader.value(30) == log  # the subscriber saw exactly the log, once, in order
            if record.status == "completed":
                assert record.result is not None and record.result.content == answer
                assert token_text(log) == answer
            else:
                assert record.error is not None, record
    keys = Keys(blips.settings.key_prefix)
    assert blips.ctx.redis.zcard(keys.streaming()) == 0
    assert blips.ctx.redis.zcard(keys.dispatched()) == 0
    assert blips.worker.alive(), f"stream worker exited:\n{blips.worker.output()[-3000:]}"
    return statuses


def test_a_redis_restart_during_live_streams_is_ridden_out(
        tmp_path: Path, sim_url: str, make_settings: Callable[..., Settings]) -> None:
    blips = BlipStack(tmp_path, sim_url, make_settings)
    try:
        statuses = blip_trial(blips, sim_url, streams=20, outage_s=3.0)
    finally:
        blips.close()
    assert statuses.get("completed", 0) >= 18, statuses


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_twenty_redis_restarts_of_up_to_ten_seconds_under_fifty_streams(
        tmp_path: Path, sim_url: str, make_settings: Callable[..., Settings]) -> None:
    """20 consecutive trials on one deployment: Redis down 2 s to 10 s under 50 live streams."""
    blips = BlipStack(tmp_path, sim_url, make_settings)
    totals: dict[str, int] = {}
    try:
        for trial in range(20):
            outage = 2.0 + 8.0 * trial / 19
            statuses = blip_trial(blips, sim_url, streams=50, outage_s=outage)
            assert statuses.get("completed", 0) >= 45, (trial, outage, statuses)
            for status, n in statuses.items():
                totals[status] = totals.get(status, 0) + n
    finally:
        blips.close()
    print(f"20 Redis restarts (2-10 s) under 50 streams each: {totals}")
