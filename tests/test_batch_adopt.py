"""No request in two batches: a batch the upstream made but Redis never heard of is adopted.

Real Redis, the real simulator over HTTP through the openai SDK. The flush is "killed" with its
test hook (an exception, like the existing crash tests), and a lost create answer is a real
HTTP proxy in front of the simulator that forwards the create and answers 502.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from hybrid_router.workers.batch import claim as batch_claim
from hybrid_router.workers.batch.adopt import note_upload
from hybrid_router.workers.batch.flush import FlushContext, flush
from hybrid_router.workers.batch.poll import PollContext, poll
from hybrid_router.workers.batch.record import record_batch
from hybrid_router.workers.upstream.base import make_openai_client
from tests.batch_helpers import event_types, record, submit_low
from tests.support import free_port, wait_until


def _ctx(settings: Settings, client: redis.Redis, **kw: Any) -> FlushContext:
    return FlushContext(settings, client, make_openai_client(settings, max_retries=2), **kw)


def _batches_of_claim(upstream: openai.OpenAI, claim_id: str) -> list[Any]:
    return [b for b in upstream.batches.list(limit=100)
            if (b.metadata or {}).get("claim_id") == claim_id]


def _poll_until_done(settings: Settings, client: redis.Redis, ids: list[str]) -> None:
    ctx = PollContext(settings, client, make_openai_client(settings))

    def done() -> bool:
        poll(ctx)
        return all(record(client, settings, i).status == "completed" for i in ids)

    wait_until(done, 15, 0.1, message="every request completed")


def _claim_recorder() -> tuple[list[batch_claim.Claim], Callable[[batch_claim.Claim], None]]:
    claims: list[batch_claim.Claim] = []
    return claims, claims.append


def test_flush_killed_after_create_adopts_the_batch(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"adopt {i}") for i in range(6)]
    claims, remember = _claim_recorder()

    def die(_batch_id: str) -> None:
        raise RuntimeError("worker killed between the create and the record")

    with pytest.raises(RuntimeError):
        flush(_ctx(settings, redis_client, after_claim=remember, after_create=die))
    upstream = make_openai_client(settings)
    made = _batches_of_claim(upstream, claims[0].claim_id)
    assert len(made) == 1 and redis_client.zcard(keys.batches_in_flight()) == 0
    assert all(record(redis_client, settings, i).status == "queued" for i in ids)

    report = flush(_ctx(settings, redis_client))
    assert (report.adopted, report.submitted, report.batches) == (1, 6, [])
    assert report.recovered == 0  # nothing went back to the queue: all are in the batch
    assert len(_batches_of_claim(upstream, claims[0].claim_id)) == 1
    assert redis_client.zcard(keys.claims()) == 0
    assert not redis_client.exists(keys.claim_uploads(claims[0].claim_id))
    for request_id in ids:
        rec = record(redis_client, settings, request_id)
        assert (rec.status, rec.batch_id) == ("submitted", made[0].id)
    _poll_until_done(settings, redis_client, ids)
    for request_id in ids:
        assert event_types(redis_client, settings, request_id).count("submitted") == 1
    # Nothing left to flush, and no second batch was ever made of these requests.
    assert flush(_ctx(settings, redis_client)).batches == []
    assert len(_batches_of_claim(upstream, claims[0].claim_id)) == 1


def test_a_batch_the_poll_already_finished_is_followed_again(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    """Killed after the record but before the requests were marked: the poll finds the batch
    ended with no members and drops it; adopting its requests must put it back in flight."""
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"late members {i}") for i in range(4)]
    claims, remember = _claim_recorder()
    made: list[str] = []

    def record_then_die(batch_id: str) -> None:
        made.append(batch_id)
        record_batch(redis_client, settings, batch_id, "gpt-4o-mini", "native", len(ids))
        raise RuntimeError("worker killed before marking the requests")

    with pytest.raises(RuntimeError):
        flush(_ctx(settings, redis_client, after_claim=remember, after_create=record_then_die))
    ctx = PollContext(settings, redis_client, make_openai_client(settings))
    wait_until(lambda: made[0] in poll(ctx).finished, 15, 0.1, message="empty batch finished")
    assert redis_client.zcard(keys.batches_in_flight()) == 0
    assert all(record(redis_client, settings, i).status == "queued" for i in ids)

    report = flush(_ctx(settings, redis_client))
    assert (report.adopted, report.submitted, report.batches) == (1, 4, [])
    assert redis_client.zscore(keys.batches_in_flight(), made[0]) is not None
    _poll_until_done(settings, redis_client, ids)
    assert len(_batches_of_claim(make_openai_client(settings), claims[0].claim_id)) == 1


def test_an_upload_no_batch_was_made_of_is_deleted_and_its_requests_go_once(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str,
        tmp_path: Any) -> None:
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"upload only {i}") for i in range(3)]
    claim = batch_claim.claim(redis_client, keys, "gpt-4o-mini", 10)
    assert claim is not None
    upstream = make_openai_client(settings)
    path = tmp_path / "part.jsonl"
    path.write_text("")
    with path.open("rb") as fh:
        uploaded = upstream.files.create(file=(path.name, fh), purpose="batch")
    note_upload(redis_client, keys, claim.claim_id, uploaded.id)  # ... and the flush died

    report = flush(_ctx(settings, redis_client))
    assert report.adopted == 0 and report.recovered == 3
    with pytest.raises(openai.NotFoundError):
        upstream.files.retrieve(uploaded.id)
    assert len(report.batches) == 1 and report.submitted == 3
    _poll_until_done(settings, redis_client, ids)


def test_a_claim_is_kept_while_the_upstream_cannot_say_what_it_made(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    down = make_settings(upstream_base_url=f"http://127.0.0.1:{free_port()}/v1",
                         batch_mode="native", upstream_timeout_s=2)
    keys = Keys(down.key_prefix)
    ids = [submit_low(redis_client, down, f"kept {i}") for i in range(2)]
    claim = batch_claim.claim(redis_client, keys, "gpt-4o-mini", 10)
    assert claim is not None
    note_upload(redis_client, keys, claim.claim_id, "file-unknown")

    report = flush(FlushContext(down, redis_client, make_openai_client(down)))
    assert report.recovered == 0 and report.submitted == 0
    assert redis_client.zscore(keys.claims(), claim.claim_id) is not None
    assert redis_client.llen(keys.pending("gpt-4o-mini")) == 0  # not put back: maybe in a batch

    up = down.model_copy(update={"upstream_base_url": sim_url})
    report = flush(_ctx(up, redis_client))
    assert report.recovered == 2 and report.submitted == 2 and len(report.batches) == 1
    assert redis_client.zcard(keys.claims()) == 0
    _poll_until_done(up, redis_client, ids)


# --- a create whose answer is lost -----------------------------------------------------------


class HeldCreate:
    """A `POST /v1/batches` the proxy holds: forwarded only once `release` is set (long after
    the client gave up on it), then `forwarded` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.forwarded = threading.Event()


@contextmanager
def answer_losing_proxy(target: str, lose_creates: int = 0, refuse_lists: bool = False,
                        hold: HeldCreate | None = None) -> Iterator[str]:
    """An HTTP proxy to `target` that forwards everything, but answers the first
    `lose_creates` `POST /v1/batches` with a 502 after the upstream has made the batch, with
    `refuse_lists` answers `GET /v1/batches` with a 404 (an upstream without the list), and with
    `hold` holds the first create until `hold.release` (a create that arrives late)."""
    lost = [0]
    held_once = [False]
    origin = httpx.URL(target)

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            route = self.path.split("?")[0].rstrip("/")
            creating = self.command == "POST" and route.endswith("/batches")
            held = hold is not None and creating and not held_once[0]
            if held:
                held_once[0] = True
                assert hold is not None
                hold.release.wait(30)
            if refuse_lists and self.command == "GET" and route.endswith("/batches"):
                self._answer(404, b'{"error": {"message": "no such route", "type": '
                                  b'"invalid_request_error"}}')
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "content-length", "connection")}
            url = origin.copy_with(raw_path=self.path.encode())
            answer = httpx.request(self.command, url, headers=headers, content=body, timeout=30)
            if held:
                assert hold is not None
                hold.forwarded.set()
            if (self.command == "POST" and route.endswith("/batches")
                    and lost[0] < lose_creates):
                lost[0] += 1
                self._answer(502, b'{"error": {"message": "bad gateway", "type": '
                                  b'"server_error"}}')
                return
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection",
                                       "content-encoding"):
                    self.send_header(key, value)
            self.send_header("content-length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def _answer(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = _forward

        def log_message(self, *_args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_a_lost_create_answer_makes_one_batch_not_two(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    origin = sim_url.removesuffix("/v1")
    with answer_losing_proxy(origin, lose_creates=1) as proxied:
        settings = make_settings(upstream_base_url=proxied, batch_mode="native",
                                 retry_backoff_base_s=0.05)
        ids = [submit_low(redis_client, settings, f"lost answer {i}") for i in range(5)]
        claims, remember = _claim_recorder()
        report = flush(_ctx(settings, redis_client, after_claim=remember))
        assert report.error is None and report.submitted == 5 and len(report.batches) == 1
        made = _batches_of_claim(make_openai_client(settings), claims[0].claim_id)
        assert [b.id for b in made] == [report.batches[0]["batch_id"]]
        _poll_until_done(settings, redis_client, ids)


def test_a_create_made_late_after_its_retry_is_cancelled_by_the_next_flush(
        make_settings: Callable[..., Settings], redis_client: redis.Redis) -> None:
    """The first create times out and the list shows nothing, so it is tried again; then the
    first one reaches the upstream after all. The next flush cancels that late second batch:
    the requests are paid for once, in the batch Redis follows."""
    from hybrid_router.simulator.testing import running_simulator

    hold = HeldCreate()
    with running_simulator(ttft_s=0.0, tokens_per_s=0.0, batch_turnaround_s=30.0) as sim, \
            answer_losing_proxy(sim.removesuffix("/v1"), hold=hold) as proxied:
        settings = make_settings(upstream_base_url=proxied, batch_mode="native",
                                 upstream_timeout_s=1.0, retry_backoff_base_s=0.05)
        keys = Keys(settings.key_prefix)
        ids = [submit_low(redis_client, settings, f"late twin {i}") for i in range(4)]
        claims, remember = _claim_recorder()
        report = flush(_ctx(settings, redis_client, after_claim=remember))
        assert report.error is None and report.submitted == 4 and len(report.batches) == 1
        kept = report.batches[0]["batch_id"]
        assert redis_client.zcard(keys.late_twin_watch()) == 1
        hold.release.set()
        assert hold.forwarded.wait(20), "the held create never reached the upstream"
        upstream = make_openai_client(settings)
        made = _batches_of_claim(upstream, claims[0].claim_id)
        assert len(made) == 2 and kept in [b.id for b in made]  # the late twin exists
        [late] = [b.id for b in made if b.id != kept]

        again = flush(_ctx(settings, redis_client))
        assert again.late_twins_cancelled == [late]
        assert upstream.batches.retrieve(late).status in ("cancelling", "cancelled")
        assert upstream.batches.retrieve(kept).status not in ("cancelling", "cancelled")
        for request_id in ids:
            rec = record(redis_client, settings, request_id)
            assert rec.status == "submitted" and rec.batch_id == kept
        assert flush(_ctx(settings, redis_client)).late_twins_cancelled == []  # once
        # Past its watch, the file is forgotten.
        [entry] = redis_client.zrange(keys.late_twin_watch(), 0, -1)
        redis_client.zadd(keys.late_twin_watch(), {entry: 0})
        flush(_ctx(settings, redis_client))
        assert redis_client.zcard(keys.late_twin_watch()) == 0


def test_an_upstream_that_cannot_list_batches_gets_the_claim_released(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    """A 4xx to the list will not change by asking again: the claim is not kept forever."""
    with answer_losing_proxy(sim_url.removesuffix("/v1"), refuse_lists=True) as proxied:
        settings = make_settings(upstream_base_url=proxied, batch_mode="native")
        keys = Keys(settings.key_prefix)
        ids = [submit_low(redis_client, settings, f"no list {i}") for i in range(2)]
        claim = batch_claim.claim(redis_client, keys, "gpt-4o-mini", 10)
        assert claim is not None
        note_upload(redis_client, keys, claim.claim_id, "file-from-a-dead-flush")
        report = flush(_ctx(settings, redis_client))
        assert report.recovered == 2 and report.submitted == 2 and len(report.batches) == 1
        assert redis_client.zcard(keys.claims()) == 0
        _poll_until_done(settings, redis_client, ids)
