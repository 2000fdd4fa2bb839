"""The Lua scripts of the batch lane: claim, release, submit, finish, requeue, escalate, lock.

In the style of `hybrid_router.router.core.lua`: each multi-step move is one script, so a crash between two writes
cannot leave a request half-moved. Scripts that touch many requests take their keys in chunks
(three keys per request: record, seq, events), never build a key inside Lua.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import hiredis
import redis

from hybrid_router.router.core.lua import _COMMON, LuaScript
from hybrid_router.router.core.redis_io import SyncClient, SyncPipe, reply_error

T = TypeVar("T")
ScriptCall = tuple[list[str], list[Any]]

# Claim the head of one model's pending list into a claimed list, registered in the claims set.
# KEYS: pending, claimed, claims, models-set
# ARGV: limit, claim_id, now, model
# Returns the claimed ids in queue order.
CLAIM = """
local limit = tonumber(ARGV[1])
local ids = redis.call('LRANGE', KEYS[1], 0, limit - 1)
if #ids == 0 then
  if redis.call('LLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[4], ARGV[4]) end
  return ids
end
redis.call('LTRIM', KEYS[1], #ids, -1)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
for i = 1, #ids, 4000 do
  redis.call('RPUSH', KEYS[2], unpack(ids, i, math.min(i + 3999, #ids)))
end
return ids
"""

# Put ids back at the FRONT of a pending list (keeping their order) and optionally drop a claim.
# KEYS: pending, models-set, claimed, claims, claim-uploads
# ARGV: model, claim_id, drop_claim ('1'|'0'), ids...
RELEASE = """
for i = #ARGV, 4, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]) end
if #ARGV >= 4 then redis.call('SADD', KEYS[2], ARGV[1]) end
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[3], KEYS[5])
  redis.call('ZREM', KEYS[4], ARGV[2])
end
return #ARGV - 3
"""

# Read a few fields of many records at once (cheaper than one HMGET per request from Python).
# KEYS: records...   ARGV: field names...
# Returns a flat list: for each record, one value per field (false when missing).
FETCH = """
local out = {}
for i = 1, #KEYS do
  local values = redis.call('HMGET', KEYS[i], unpack(ARGV))
  for j = 1, #ARGV do out[#out + 1] = values[j] end
end
return out
"""

# Mark many requests `submitted` in one batch (only those still `queued`) and emit `submitted`.
# They leave the deadlines index: it holds only `queued` requests (REQUEUE puts them back).
# KEYS: members-set, deadlines, then per request: record, seq, events
# ARGV: batch_id, now, maxlen, ev_ttl, event, then per request: id, channel
# Returns the number moved.
SUBMIT_MANY = (
    _COMMON
    + """
local moved = 0
local n = (#KEYS - 2) / 3
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[6 + 2 * i] end
if n > 0 then redis.call('SADD', KEYS[1], unpack(ids)) end
local left = {}
for i = 0, n - 1 do
  local rec, seq, events = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local channel = ARGV[7 + 2 * i]
  if may_move(redis.call('HGET', rec, 'status'), 'submitted') then
    redis.call('HSET', rec, 'status', 'submitted', 'batch_id', ARGV[1], 'started_at', ARGV[2])
    emit(seq, events, channel, ARGV[3], ARGV[4], ARGV[5])
    moved = moved + 1
    left[#left + 1] = ids[i + 1]
  end
end
if #left > 0 then redis.call('ZREM', KEYS[2], unpack(left)) end
return moved
"""
)

# Move one request to a terminal state and add its cost to the ledger in the same step, so a
# result written twice changes nothing and is counted once. With the deadlines index as a fifth
# key, the request leaves it (it held the request while `queued`).
# KEYS: record, seq, events, ledger[, deadlines]
# ARGV: allowed (comma list), to_status, channel, maxlen, ev_ttl, record_ttl, event,
#       n_ledger, ledger field, amount, ..., record field, value, ...
# Returns {moved (1|0|-1), previous_status, callback_url or ''}.
FINISH = (
    _COMMON
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
if is_terminal(cur) then return {0, cur} end
local ok = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then ok = true end end
if not ok then return {0, cur} end
local n_ledger = tonumber(ARGV[8])
for i = 9, 8 + 2 * n_ledger, 2 do
  redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1])
end
local fields = {'status', ARGV[2]}
for i = 9 + 2 * n_ledger, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
if #KEYS >= 5 then redis.call('ZREM', KEYS[5], redis.call('HGET', KEYS[1], 'id')) end
emit(KEYS[2], KEYS[3], ARGV[3], ARGV[4], ARGV[5], ARGV[7])
return {1, cur, redis.call('HGET', KEYS[1], 'callback_url') or ''}
"""
)

# The write-back's FINISH for many requests in one call: each request still `submitted` moves to
# `completed` (result, cost_usd, finished_at, usage when given) or `failed` (error, finished_at)
# and emits its event; the ledger gets the summed amounts of exactly the requests that moved, in
# the same script, so a result written twice changes nothing and is counted once. Amounts are
# summed in Lua doubles while that stays exact (< 2^52, each at most 15 digits), else added
# on their own.
# A request cancelled after it was submitted in this batch still had its line run and billed
# (the Batch API cannot cancel one line): its usage and cost_usd are written to the cancelled
# record and its amounts to the ledger, once (a record that has a cost_usd is left alone); its
# status and events stay as the cancel left them.
# KEYS: ledger, then per request: record, seq, events
# ARGV: allowed (comma list), maxlen, ev_ttl, record_ttl, finished_at, batch_id, n_ledger,
#       ledger field names..., then per request:
#         'completed', channel, event, n_ledger amounts, result_json, cost_usd, usage_json|''
#      or 'failed', channel, event, error_json
# Returns a flat list, per request: moved (1 moved | 2 paid after its cancel | 0 | -1 missing),
# callback_url or '', created_at or ''.
FINISH_MANY = (
    _COMMON
    + """
local allowed = {}
for s in string.gmatch(ARGV[1], '[^,]+') do allowed[s] = true end
local maxlen, ev_ttl, rec_ttl, finished = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local batch_id = ARGV[6]
local n_ledger = tonumber(ARGV[7])
local sums = {}
for j = 1, n_ledger do sums[j] = 0 end
local function add(j, amount)
  if #amount > 15 then
    redis.call('HINCRBY', KEYS[1], ARGV[7 + j], amount)
    return
  end
  sums[j] = sums[j] + tonumber(amount)
  if sums[j] >= 4503599627370496 or sums[j] <= -4503599627370496 then
    redis.call('HINCRBY', KEYS[1], ARGV[7 + j], string.format('%.0f', sums[j]))
    sums[j] = 0
  end
end
-- A completed line is billed: its amounts go to the ledger, its cost (and usage) on the record,
-- with `...` (more field, value pairs) in the same HSET.
local function bill(rec, at, ...)
  for j = 1, n_ledger do add(j, ARGV[at + j - 1]) end
  local v = at + n_ledger
  if ARGV[v + 2] ~= '' then
    redis.call('HSET', rec, 'cost_usd', ARGV[v + 1], 'usage', ARGV[v + 2], ...)
  else
    redis.call('HSET', rec, 'cost_usd', ARGV[v + 1], ...)
  end
end
local out = {}
local a = 8 + n_ledger
for k = 2, #KEYS, 3 do
  local rec = KEYS[k]
  local to_status, channel, event = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local at = a + 3
  if to_status == 'completed' then a = at + n_ledger + 3 else a = at + 1 end
  local cur = redis.call('HMGET', rec, 'status', 'callback_url', 'created_at')
  local paid_after_cancel = false
  if cur[1] == 'cancelled' and to_status == 'completed' then
    local billed = redis.call('HMGET', rec, 'batch_id', 'cost_usd')
    paid_after_cancel = billed[1] == batch_id and not billed[2]
  end
  if not cur[1] then
    out[#out + 1] = -1; out[#out + 1] = ''; out[#out + 1] = ''
  elseif paid_after_cancel then
    bill(rec, at)
    out[#out + 1] = 2; out[#out + 1] = ''; out[#out + 1] = ''
  elseif not may_move(cur[1], to_status) or not allowed[cur[1]] then
    out[#out + 1] = 0; out[#out + 1] = ''; out[#out + 1] = ''
  else
    if to_status == 'completed' then
      bill(rec, at, 'status', 'completed', 'result', ARGV[at + n_ledger], 'finished_at', finished)
    else
      redis.call('HSET', rec, 'status', 'failed', 'error', ARGV[at], 'finished_at', finished)
    end
    redis.call('EXPIRE', rec, rec_ttl)
    emit(KEYS[k + 1], KEYS[k + 2], channel, maxlen, ev_ttl, event)
    out[#out + 1] = 1; out[#out + 1] = cur[2] or ''; out[#out + 1] = cur[3] or ''
  end
end
for j = 1, n_ledger do
  if sums[j] ~= 0 then
    redis.call('HINCRBY', KEYS[1], ARGV[7 + j], string.format('%.0f', sums[j]))
  end
end
return out
"""
)

# A request of a batch that produced no result for it goes back to the front of its queue
# (attempts + `charge`), or fails once it has used its attempts. Only when it is still
# `submitted` in this very batch, so a late or repeated poll cannot requeue a request twice.
# `charge` is 0 when the batch failed as a whole and is being split to find the line at fault
# (`hybrid_router.workers.batch.split`): the request did not use an attempt. A non-empty `group` is stored as
# the record's `batch_group`: the flush puts the requests of one group in a batch of their own.
# A request put back in its queue with a deadline goes back into the deadlines index.
# KEYS: record, seq, events, pending, models-set, deadlines
# ARGV: batch_id, max_attempts, channel, maxlen, ev_ttl, record_ttl, now, queued_event,
#       failed_event, error_json, id, model, charge, group
# Returns {1 requeued | 2 failed | 0 untouched, callback_url or '', created_at or ''}.
REQUEUE = (
    _COMMON
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not may_move(cur, 'queued') then return {0, ''} end
if redis.call('HGET', KEYS[1], 'batch_id') ~= ARGV[1] then return {0, ''} end
local charge = tonumber(ARGV[13])
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', charge)
if ARGV[14] ~= '' then redis.call('HSET', KEYS[1], 'batch_group', ARGV[14]) end
if charge > 0 and attempts >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[10], 'finished_at', ARGV[7])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
  emit(KEYS[2], KEYS[3], ARGV[3], ARGV[4], ARGV[5], ARGV[9])
  local tail = redis.call('HMGET', KEYS[1], 'callback_url', 'created_at')
  return {2, tail[1] or '', tail[2] or ''}
end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'batch_id')
local deadline = redis.call('HGET', KEYS[1], 'deadline_at')
if deadline then redis.call('ZADD', KEYS[6], deadline, ARGV[11]) end
redis.call('LPUSH', KEYS[4], ARGV[11])
redis.call('SADD', KEYS[5], ARGV[12])
emit(KEYS[2], KEYS[3], ARGV[3], ARGV[4], ARGV[5], ARGV[8])
return {1, ''}
"""
)

# A claimed request whose submission the upstream refused (a 4xx that waiting will not cure):
# the refusal counts as one of its submissions (attempts + 1), and once it has used them it
# fails with the reason. Otherwise it stays `queued` for the claim's release, which follows and
# puts it back at the front of its queue. Only a request still `queued` counts, so a refusal is
# counted at most once per request per claim (the claim is released right after).
# A request that fails leaves the deadlines index.
# KEYS: record, seq, events, deadlines
# ARGV: max_attempts, channel, maxlen, ev_ttl, record_ttl, now, failed_event, error_json
# Returns {1 counted | 2 failed | 0 untouched, callback_url or '', created_at or ''}.
COUNT_REFUSAL = (
    _COMMON
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return {0, '', ''} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts < tonumber(ARGV[1]) then return {1, '', ''} end
redis.call('ZREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[8], 'finished_at', ARGV[6])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
emit(KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4], ARGV[7])
local tail = redis.call('HMGET', KEYS[1], 'callback_url', 'created_at')
return {2, tail[1] or '', tail[2] or ''}
"""
)

# Move a queued low request to the stream lane because a batch would miss its deadline.
# KEYS: record, seq, events, pending, dispatched, deadlines
# ARGV: id, channel, maxlen, ev_ttl, now, route_reason, event
# Returns 1 moved, 0 not queued any more.
ESCALATE = (
    _COMMON
    + """
redis.call('ZREM', KEYS[6], ARGV[1])
if not may_move(redis.call('HGET', KEYS[1], 'status'), 'dispatched') then return 0 end
redis.call('LREM', KEYS[4], 0, ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'dispatched', 'route', 'stream', 'route_reason', ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
emit(KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4], ARGV[7])
return 1
"""
)

# Release a lock only if we still hold it (our token), or extend it.
# KEYS: lock   ARGV: token, ('' = release | ttl ms = extend)
LOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
"""

CLAIM_SCRIPT = LuaScript(CLAIM)
RELEASE_SCRIPT = LuaScript(RELEASE)
FETCH_SCRIPT = LuaScript(FETCH)
SUBMIT_MANY_SCRIPT = LuaScript(SUBMIT_MANY)
FINISH_SCRIPT = LuaScript(FINISH)
FINISH_MANY_SCRIPT = LuaScript(FINISH_MANY)
REQUEUE_SCRIPT = LuaScript(REQUEUE)
COUNT_REFUSAL_SCRIPT = LuaScript(COUNT_REFUSAL)
ESCALATE_SCRIPT = LuaScript(ESCALATE)
LOCK_SCRIPT = LuaScript(LOCK)


def run_pipelined(
    client: redis.Redis, script: LuaScript, calls: Sequence[tuple[list[str], list[Any]]]
) -> list[Any]:
    """Run one script many times in one round trip (EVALSHA; loads the script if Redis lost it).

    Only the script's own calls are in the pipeline, so re-running it after NOSCRIPT is safe:
    a missing script fails every call before any ran.
    """
    if not calls:
        return []
    if len(calls) > 1:
        # Load first: a pipeline sent to a Redis without the script (a restart, a new server)
        # would carry every call's arguments twice, megabytes for a flush of 50,000.
        client.script_load(script.source)
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        try:
            return list(pipe.execute())
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            client.script_load(script.source)
    raise AssertionError("unreachable")


def _answer(pipe: SyncPipe, client: redis.Redis, script: LuaScript, call: ScriptCall) -> Any:
    """The next reply on `pipe`, that of `call`; a call answered NOSCRIPT is run again."""
    reply = pipe.read()
    if isinstance(reply, hiredis.ReplyError):
        error = reply_error(reply)
        if not isinstance(error, redis.exceptions.NoScriptError):
            raise error
        return run_pipelined(client, script, [call])[0]
    return reply


def run_overlapped(client: redis.Redis, script: LuaScript,
                   items: Iterable[tuple[T, ScriptCall | None]],
                   depth: int = 1) -> Iterator[tuple[T, Any]]:
    """Run one script per item, yielding `(item, answer)` in order, `depth` calls in flight.

    Call k+depth is sent before the answer of call k is read, so Redis runs calls while this
    thread builds the next one (`items` is consumed lazily) and settles the previous one: the two
    CPUs work at once, without a helper thread fighting this one for the GIL. A depth above 1
    keeps Redis busy through chunks that take this thread longer than usual. An item without a
    call yields `None`. A call answered NOSCRIPT did not run at all, so it is run again (loading
    the script); with depth > 1 it then runs after calls sent later, so the calls must not
    depend on each other's order. If `items` raises, the calls already sent are answered first.
    The calls go over a raw connection of their own (`SyncPipe`, packed by hiredis straight
    from the arguments), opened to `client`'s server and closed at the end.
    """
    if not isinstance(client, SyncClient):
        raise TypeError("run_overlapped needs a client from hybrid_router.router.core.redis_io"
                        ".sync_client (it opens a raw connection to the same server)")
    in_flight: deque[tuple[T, ScriptCall | None]] = deque()
    client.script_load(script.source)
    pipe = SyncPipe(client.url)

    def answer(item: T, call: ScriptCall | None) -> tuple[T, Any]:
        return item, None if call is None else _answer(pipe, client, script, call)

    try:
        iterator = iter(items)
        while True:
            try:
                item, call = next(iterator)
            except StopIteration:
                break
            except BaseException:
                # Building the next call failed (say the download broke): what was sent has
                # run, so its answer is still handed out before the error goes up.
                while in_flight:
                    yield answer(*in_flight.popleft())
                raise
            if call is not None:
                keys, args = call
                pipe.send([("EVALSHA", script.sha, len(keys), *keys, *args)])
            in_flight.append((item, call))
            if len(in_flight) > depth:
                yield answer(*in_flight.popleft())
        while in_flight:
            yield answer(*in_flight.popleft())
    finally:
        pipe.close()
