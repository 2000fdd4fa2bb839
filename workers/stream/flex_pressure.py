"""The flex lane under pressure: what a stream run does when the upstream refuses a flex call.

- **429 "resource unavailable"**: retried with backoff while the deadline allows a retry and
  then a standard call; then the request moves, once: to the batch lane when its deadline is
  still far (a batch round trip fits and nothing was relayed yet), else to the standard tier
  at once. A 429 is not billed, so nothing is paid twice.
- **400 "model does not support flex"**: the model is remembered (`hybrid_router.router.core.lane_facts`, with
  expiry) so that the intake stops choosing flex for it, and the request is sent at the
  standard tier at once. One warning line says so.

`flex_verdict` is the decision, a plain function; `move_to_batch` the one script that moves a
streaming request back to the batch queue (record, queue, event, lease in one step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import openai

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.lua import _COMMON, LuaScript
from hybrid_router.router.core.records import RequestRecord, dumps
from hybrid_router.router.core.replay import replay_policy
from hybrid_router.settings import Settings

Verdict = Literal["retry", "standard", "batch"]


@dataclass(frozen=True)
class FlexVerdict:
    action: Verdict
    reason: str
    delay_s: float = 0.0


def is_flex_refusal(exc: BaseException) -> bool:
    """A 400 that says the model is not served at the flex tier (it names ``service_tier``
    as the parameter, or speaks of flex)."""
    if not isinstance(exc, openai.APIStatusError) or exc.status_code != 400:
        return False
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error", body) if isinstance(body, dict) else {}
    param = inner.get("param") if isinstance(inner, dict) else None
    message = str(inner.get("message") if isinstance(inner, dict) else exc.message).lower()
    return param == "service_tier" or "service_tier" in message or "flex" in message


def is_resource_unavailable(exc: BaseException) -> bool:
    """A 429 on a flex call: the flex capacity is exhausted for now."""
    return isinstance(exc, openai.APIStatusError) and exc.status_code == 429


def deadline_at(record: RequestRecord, settings: Settings) -> float | None:
    """When the request must be done: its own deadline, else its priority's default."""
    if record.deadline_at is not None:
        return record.deadline_at
    default = settings.deadline_for(record.priority)
    return record.created_at + default if default is not None else None


def flex_verdict(
    record: RequestRecord,
    settings: Settings,
    *,
    retries_so_far: int,
    backoff_s: float,
    relayed_anything: bool,
    may_batch: bool,
    now: float | None = None,
) -> FlexVerdict:
    """What to do after a flex call answered 429. Retry (after `backoff_s`) while retries are
    left and the deadline still has room for the wait plus a standard call; else move: to the
    batch lane when a batch round trip still fits (and nothing was relayed), else standard."""
    now = time.time() if now is None else now
    due = deadline_at(record, settings)
    left = (due - now) if due is not None else float("inf")
    standard_s = settings.expected_stream_latency_s
    flex_s = record.expected_latency_s or settings.expected_flex_latency_s
    if retries_so_far < settings.flex_max_retries and backoff_s + flex_s <= left:
        return FlexVerdict("retry", f"flex resource unavailable (429); retry "
                           f"{retries_so_far + 1} of {settings.flex_max_retries} in "
                           f"{backoff_s:.2f}s", backoff_s)
    round_trip = settings.flush_interval_s + settings.expected_batch_turnaround_s
    why = ("its retries are spent" if retries_so_far >= settings.flex_max_retries else
           f"the deadline leaves {max(left, 0):.1f}s, too little to wait for flex")
    if may_batch and not relayed_anything and round_trip <= left:
        return FlexVerdict("batch", f"flex resource unavailable (429) and {why}; the deadline "
                           f"({left:.0f}s left) allows a batch round trip ({round_trip:g}s), so "
                           "it moves to the batch lane")
    return FlexVerdict("standard", f"flex resource unavailable (429) and {why}; "
                       f"{'the deadline is near' if left < round_trip else 'it cannot wait'}, "
                       f"so it moves to the standard tier (expected {standard_s:g}s)")


def lane_changed(from_lane: str, to_lane: str, tier: str | None, reason: str) -> str:
    """The event announcing that a request moved lanes (once)."""
    return dumps({"type": "lane_changed", "from": from_lane, "to": to_lane, "tier": tier,
                  "reason": reason})


# KEYS: record, seq, events, pending list, pending models, lease, running zset, deadlines
# ARGV: id, lease owner, channel, maxlen, ev policy, model, event, deadline ('' = none),
#       n (field arguments), field, value...
# Moves a `streaming` request (this run's: no other lease holder) back to `queued` on the
# batch lane, in one step: record, queue entry, deadline index, event, lease and running index.
# Returns 1 moved, 0 not (terminal, or another worker holds it).
MOVE_TO_BATCH = LuaScript(_COMMON + """
if redis.call('HGET', KEYS[1], 'status') ~= 'streaming' then return 0 end
local holder = redis.call('GET', KEYS[6])
if holder and holder ~= ARGV[2] then return 0 end
local n = tonumber(ARGV[9])
redis.call('HSET', KEYS[1], 'status', 'queued', unpack(ARGV, 10, 9 + n))
redis.call('HDEL', KEYS[1], 'service_tier', 'started_at')
redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[6])
if ARGV[8] ~= '' then redis.call('ZADD', KEYS[8], ARGV[8], ARGV[1]) end
if holder then redis.call('DEL', KEYS[6]) end
redis.call('ZREM', KEYS[7], ARGV[1])
emit(KEYS[2], KEYS[3], ARGV[3], ARGV[4], ARGV[5], ARGV[7])
return 1
""")


def move_to_batch_call(record: RequestRecord, settings: Settings, owner: str,
                       reason: str) -> tuple[LuaScript, list[str], list[Any]]:
    """The script call that moves `record` to the batch lane (see `MOVE_TO_BATCH`)."""
    k = Keys(settings.key_prefix)
    body = {name: value for name, value in record.body.items() if name != "service_tier"}
    fields = ["route", "batch", "route_reason", f"{record.route_reason}; then {reason}",
              "body", dumps(body)]
    deadline = record.deadline_at
    return MOVE_TO_BATCH, [
        k.record(record.id), k.seq(record.id), k.events(record.id), k.pending(record.model),
        k.pending_models(), k.lease(record.id), k.streaming(), k.batch_deadlines(),
    ], [
        record.id, owner, k.channel(record.id), settings.replay_maxlen, replay_policy(settings),
        record.model, lane_changed("flex", "batch", None, reason),
        repr(deadline) if deadline is not None else "", len(fields), *fields,
    ]
