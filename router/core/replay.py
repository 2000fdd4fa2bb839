"""What a finished request keeps in Redis: the compaction of its record and replay log.

While a request runs, and for `Settings.replay_grace_s` after it ends, it has a record (a hash
of ~20 fields), a replay log (a Redis Stream: at least ~4.7 KB, as Redis preallocates a stream's
node) and a seq counter. The final event's `emit()` (hybrid_router.router.core.lua) indexes the request in
`Keys.replay_due` for `grace` seconds later; then `compact_due` (run once a second by the stream
engines' housekeeping and by every batch poll) replaces all three by one compact record:

- plain fields kept: ``status`` and ``tenant`` (the scripts and the ownership check read them),
  and, for a cancelled request inside a batch that was not billed yet, ``batch_id`` (the
  write-back of a batch result bills it later, exactly once);
- everything else in one field ``z``: zlib-compressed JSON of the record's other fields (the
  body only with `Settings.keep_body`) and of the replay: the final event as it was sent, and
  the token events' seqs and lengths (the text is the result's content, or kept whole when it
  differs, e.g. a cancelled stream's partial text), and a Responses stream's ``response``
  events whole (they are relayed as the upstream sent them).

`RequestRecord.from_hash` reads ``z`` transparently; `compacted_events` rebuilds what a
subscriber resuming after seq N needs: one token event (at the last token seq) with exactly the
text after seq N, then the final event with its original seq. Only a terminal request is ever
compacted (the script checks, and that neither the record nor the log changed since read), so a
stream being taken over (`hybrid_router.workers.stream.relay._take_over` reads its token events back from the
log) is never touched. When no compactor runs, nothing changes from before: the log expires
after `Settings.replay_ttl_s`.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from typing import Any

import orjson
import redis

from hybrid_router.router.core.events import FINAL_EVENT_TYPES, parse_event
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.lua import COMPACT_SCRIPT
from hybrid_router.router.core.records import JSON_FIELDS, PACKED_FIELD, REPLAY, pack, unpack
from hybrid_router.router.core.redis_text import text
from hybrid_router.settings import Settings

COMPACT_BATCH = 200  # requests compacted per call at most
RETRY_S = 30  # a request whose compaction failed or raced is tried again this much later


def replay_policy(settings: Settings) -> str:
    """The replay argument of every script that emits events (`emit()` in hybrid_router.router.core.lua): the
    log's TTL, the grace period and the index of requests due for compaction."""
    due = Keys(settings.key_prefix).replay_due()
    return f"{settings.replay_ttl_s} {settings.replay_grace_s} {due}"


def compact_fields(raw: dict[str, str], log: list[dict[str, Any]], keep_body: bool
                   ) -> list[str | bytes]:
    """The compact record (HSET arguments) of a finished request's record `raw` (text fields)
    and its replay log's events `log`."""
    plain = {"status", "tenant"}
    if raw.get("status") == "cancelled" and raw.get("batch_id") and "cost_usd" not in raw:
        plain.add("batch_id")  # billed later by the batch's write-back (hybrid_router.workers.batch.lua)
    packed: dict[str, Any] = {}
    for name, value in raw.items():
        if name in plain or (name == "body" and not keep_body):
            continue
        packed[name] = orjson.loads(value) if name in JSON_FIELDS else value
    tokens = [e for e in log if e.get("type") == "token"]
    final = next((e for e in reversed(log) if e.get("type") in FINAL_EVENT_TYPES), None)
    replay: dict[str, Any] = {}
    if final is not None:
        replay["f"] = final
    upstream = [e for e in log if e.get("type") == "response"]
    if upstream:  # a Responses stream's events are relayed as sent: each is kept whole
        replay["r"] = upstream
    if tokens:
        seqs = [int(e["seq"]) for e in tokens]
        replay["s"] = [seqs[0]] + [b - a for a, b in itertools.pairwise(seqs)]
        replay["n"] = [len(e.get("content") or "") for e in tokens]
        whole = "".join(e.get("content") or "" for e in tokens)
        result = packed.get("result")
        if not (isinstance(result, dict) and result.get("content") == whole):
            replay["x"] = whole
    packed[REPLAY] = replay
    out: list[str | bytes] = []
    for name in sorted(plain):
        if name in raw:
            out += [name, raw[name]]
    return [*out, PACKED_FIELD, pack(packed)]


def compacted_events(packed: bytes | str | None, after_seq: int) -> list[dict[str, Any]]:
    """The events after `after_seq` of a compacted request (its record's ``z`` field): the
    text not yet seen as one token event at the last token seq, then the final event."""
    if packed is None:
        return []
    data = unpack(packed)
    replay = data.get(REPLAY) or {}
    final = replay.get("f")
    out: list[dict[str, Any]] = []
    if replay.get("s"):
        seqs, total = [], 0
        for step in replay["s"]:
            total += int(step)
            seqs.append(total)
        result = data.get("result") if isinstance(data.get("result"), dict) else {}
        whole = replay.get("x", (result or {}).get("content") or "")
        seen = sum(n for seq, n in zip(seqs, replay["n"], strict=True) if seq <= after_seq)
        if seqs[-1] > after_seq and whole[seen:]:
            out.append({"seq": seqs[-1], "type": "token", "content": whole[seen:]})
    out += [e for e in replay.get("r") or () if int(e["seq"]) > after_seq]
    if final is not None and int(final["seq"]) > after_seq:
        out.append(final)
    return out


def _digest(raw: dict[bytes, bytes]) -> str:
    """The record's fingerprint, as COMPACT computes it (fields sorted by name)."""
    flat: list[bytes] = []
    for name, value in sorted(raw.items()):
        flat += [name, value]
    return hashlib.sha1(b"\0".join(flat)).hexdigest()


def compact_one(client: redis.Redis, settings: Settings, request_id: str) -> int:
    """Compact one finished request (see COMPACT in hybrid_router.router.core.lua for the outcome codes)."""
    k = Keys(settings.key_prefix)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(k.record(request_id))
    pipe.xrange(k.events(request_id))
    raw, entries = pipe.execute()
    keys = [k.record(request_id), k.events(request_id), k.seq(request_id), k.replay_due()]
    if raw and PACKED_FIELD.encode() in raw:  # compacted already: only the leftovers go
        return int(COMPACT_SCRIPT(client, keys, [request_id, _digest(raw), len(entries or []),
                                                 *_flat(raw)]))
    log = [parse_event(fields[b"d"]) for _id, fields in entries or []]
    if not raw:
        return int(COMPACT_SCRIPT(client, keys, [request_id, "", 0]))
    fields = compact_fields({text(n): text(v) for n, v in raw.items()}, log, settings.keep_body)
    return int(COMPACT_SCRIPT(client, keys, [request_id, _digest(raw), len(entries or []),
                                             *fields]))


def _flat(raw: dict[bytes, bytes]) -> list[bytes]:
    flat: list[bytes] = []
    for name, value in raw.items():
        flat += [name, value]
    return flat


def compact_due(client: redis.Redis, settings: Settings, limit: int = COMPACT_BATCH) -> int:
    """Compact the finished requests whose grace period is over (at most `limit`); returns how
    many were compacted. Any number of compactors may run: each request is put `RETRY_S`
    later in the index before it is worked on, and the script checks nothing changed."""
    k = Keys(settings.key_prefix)
    now = time.time()
    due = [text(i) for i in client.zrangebyscore(k.replay_due(), "-inf", now, start=0,
                                                  num=limit)]
    if not due:
        return 0
    client.zadd(k.replay_due(), dict.fromkeys(due, now + RETRY_S), xx=True)
    done = 0
    for request_id in due:
        done += compact_one(client, settings, request_id) == 1
    return done
