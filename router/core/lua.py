"""The Lua scripts that make every multi-step change to a request atomic.

Like dramatiq's ``dispatch.lua``: one place to read the whole protocol. A crash between two
writes cannot leave a half-moved request, because each move is one script.

Event bodies are passed as JSON objects *without* ``seq``; the script numbers them (``INCR``),
appends them to the replay stream with entry id ``0-<seq>`` and publishes them, so events from
the API, the stream worker and the batch worker share one strictly increasing sequence.
"""

from __future__ import annotations

from hybrid_router.router.core.redis_io import LuaScript, ScriptCall, run_scripts
from hybrid_router.router.core.states import LUA_STATES

__all__ = ["LuaScript", "ScriptCall", "run_scripts"]

_COMMON = LUA_STATES + """
local function is_final_event(body)
  return string.find(body, '^{"type":"done"') ~= nil or string.find(body, '^{"type":"error"') ~= nil
    or string.find(body, '^{"type":"cancelled"') ~= nil
end
-- emit(seq_key, stream_key, channel, maxlen, policy, body) -> seq
-- policy: the replay log's TTL in seconds, or "<ttl> <grace s> <due zset>" (hybrid_router.router.core.replay.
-- replay_policy): a final event (done, error, cancelled) then indexes the request (its id is
-- the key's {hash tag}) in the due zset for compaction `grace` seconds later (hybrid_router.router.core.replay).
local function emit(seq_key, stream_key, channel, maxlen, policy, body)
  local seq = redis.call('INCR', seq_key)
  local data = '{"seq":' .. seq .. ',' .. string.sub(body, 2)
  redis.call('XADD', stream_key, 'MAXLEN', '~', maxlen, '0-' .. seq, 'd', data)
  redis.call('PUBLISH', channel, data)
  -- This runs for every event (a stream's every token batch), so the policy is read cheaply:
  -- the TTL is its first word, kept a string (a plain find; a pattern with captures and a
  -- number converted back for each EXPIRE cost ~3 us a call), and only a final event's first
  -- letter (done, error, cancelled: {"type":"d|e|c...) leads to the full parse.
  local space = string.find(policy, ' ', 1, true)
  local ttl = space and string.sub(policy, 1, space - 1) or policy
  redis.call('EXPIRE', seq_key, ttl)
  redis.call('EXPIRE', stream_key, ttl)
  local kind = string.byte(body, 10)
  if space and (kind == 100 or kind == 101 or kind == 99) and is_final_event(body) then
    local grace, due = string.match(policy, '^%d+ (%d+) (.+)$')
    local t = redis.call('TIME')
    redis.call('ZADD', due, tonumber(t[1]) + tonumber(grace), string.match(stream_key, '{([^}]*)}$'))
    redis.call('EXPIRE', due, tonumber(ttl) + tonumber(grace))
  end
  return seq
end
"""

# A stream run's end (`end_run(k, a)`): give the lease back if still ours, leave the running
# index once the request is terminal and, the first time only for this run, add its ledger and
# timing increments. The marker makes the increments idempotent: a write retried after a lost
# reply, or an end repeated after a later error, counts once. KEYS[1] is always the record;
# KEYS[k..]: marker (Keys.accounted), lease, running zset, then the hashes incremented;
# ARGV[a..]: lease owner, request id, marker TTL s, then (hash position counted from the
# marker, field, amount) triples. Written in the same script as the record's last write
# (TRANSITION, ANNOTATE), so the record's cost and the ledger never disagree, whatever dies
# when. A request that is not terminal keeps its running-index entry whatever this run does:
# the sweep finds it there (no lease) and resumes it, so no request is left `streaming` unseen.
_END_RUN = """
local function end_run(k, a)
  if redis.call('GET', KEYS[k + 1]) == ARGV[a] then redis.call('DEL', KEYS[k + 1]) end
  local status = redis.call('HGET', KEYS[1], 'status')
  if (not status) or is_terminal(status) then redis.call('ZREM', KEYS[k + 2], ARGV[a + 1]) end
  if #ARGV < a + 3 then return 0 end
  if not redis.call('SET', KEYS[k], '1', 'NX', 'EX', tonumber(ARGV[a + 2])) then return 0 end
  for i = a + 3, #ARGV, 3 do
    redis.call('HINCRBY', KEYS[k - 1 + tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
  end
  return 1
end
"""

# KEYS: record, idempotency, seq, events, queue, models-set, task-list, batch-deadlines
# ARGV: id, idem_value ('' = none), idem_ttl, queue_kind ('list'|'zset'|''), now, model,
#       channel, maxlen, ev_ttl, n_events, events..., task message ('' = none),
#       batch deadline ('' = none), the record's fields as one JSON array [field, value, ...]
# The fields travel as one argument because the client encodes and frames every argument in
# Python: two dozen field/value arguments were a tenth of the API's CPU per request.
# The task message (a Celery message for the stream lane) is LPUSHed onto the task list, and a
# queued request's deadline is indexed for escalation, so record, event, task and deadline are
# written together or not at all.
CREATE = (
    _COMMON
    + """
if ARGV[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {0, existing} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, ''} end
local n_events = tonumber(ARGV[10])
local task_message = ARGV[11 + n_events]
local batch_deadline = ARGV[12 + n_events]
redis.call('HSET', KEYS[1], unpack(cjson.decode(ARGV[13 + n_events])))
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[3])) end
if ARGV[4] == 'list' then
  redis.call('RPUSH', KEYS[5], ARGV[1])
  redis.call('SADD', KEYS[6], ARGV[6])
  if batch_deadline ~= '' then redis.call('ZADD', KEYS[8], batch_deadline, ARGV[1]) end
elseif ARGV[4] == 'zset' then
  redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
end
if task_message ~= '' then redis.call('LPUSH', KEYS[7], task_message) end
local seq = 0
for i = 11, 10 + n_events do
  seq = emit(KEYS[3], KEYS[4], ARGV[7], ARGV[8], ARGV[9], ARGV[i])
end
return {1, ARGV[1]}
"""
)

# KEYS: record, seq, events[, then a stream run's end: marker, lease, running zset, hashes...]
# ARGV: allowed ('*' = any non-terminal, else comma list), to_status, channel, maxlen, ev_ttl,
#       record_ttl (0 = none), incr_attempts (0|1), event ('' = none), n (field arguments),
#       field, value... [, then the run's end arguments (see _END_RUN)]
# The run ends only when the record moved: a refused move leaves the caller to end it.
# Returns {code, previous_status}: 1 moved, 0 refused, -1 no such record; with a run's end,
# {0, 'lease_lost'} when another worker holds the request's lease.
TRANSITION = (
    _COMMON
    + _END_RUN
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
if not may_move(cur, ARGV[2]) then return {0, cur} end
if #KEYS > 3 then
  -- A stream run may end its request only while no other worker holds the lease (another
  -- worker resumed it after this one was taken for dead): 'lease_lost' refuses the move.
  local holder = redis.call('GET', KEYS[5])
  if holder and holder ~= ARGV[10 + tonumber(ARGV[9])] then return {0, 'lease_lost'} end
end
if ARGV[1] ~= '*' then
  local ok = false
  for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then ok = true end end
  if not ok then return {0, cur} end
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
local n_fields = tonumber(ARGV[9])
if n_fields > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 10, 9 + n_fields)) end
if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6])) end
if ARGV[8] ~= '' then emit(KEYS[2], KEYS[3], ARGV[3], ARGV[4], ARGV[5], ARGV[8]) end
if #KEYS > 3 then end_run(4, 10 + n_fields) end
return {1, cur}
"""
)

# KEYS: seq, events, record
# ARGV: channel, maxlen, ev_ttl, guard ('1' = refuse when the record is terminal), events...
# Returns the last seq emitted, or -1 when guarded and the record is terminal (stop streaming).
EMIT = (
    _COMMON
    + """
if ARGV[4] == '1' then
  local cur = redis.call('HGET', KEYS[3], 'status')
  if (not cur) or is_terminal(cur) then return -1 end
end
local seq = 0
for i = 5, #ARGV do
  seq = emit(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[i])
end
return seq
"""
)

# KEYS: record, seq, events, pending-list, dispatched-zset, cancel-flag, batch-deadlines
# ARGV: channel, maxlen, ev_ttl, record_ttl, now, event, flag_ttl
# Returns {outcome, status}: outcome 'cancelled', 'terminal' (already final) or 'missing'.
CANCEL = (
    _COMMON
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', ''} end
if not may_move(cur, 'cancelled') then return {'terminal', cur} end
if cur == 'queued' then
  local id = redis.call('HGET', KEYS[1], 'id')
  redis.call('LREM', KEYS[4], 0, id)
  redis.call('ZREM', KEYS[7], id)
end
if cur == 'dispatched' then redis.call('ZREM', KEYS[5], redis.call('HGET', KEYS[1], 'id')) end
if cur == 'streaming' then redis.call('SET', KEYS[6], '1', 'EX', tonumber(ARGV[7])) end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[5])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
emit(KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[6])
return {'cancelled', cur}
"""
)

# KEYS: record[, then a stream run's end: marker, lease, running zset, hashes...]
# ARGV: n (field arguments), field, value... [, then the run's end arguments (see _END_RUN)]
# Sets fields on an existing record whatever its status (never creates one, never moves it):
# e.g. the tokens a cancelled stream paid for. Returns 1, or 0 when the record does not exist.
# A run's end is written either way (its tokens were paid for).
ANNOTATE = (
    _COMMON
    + _END_RUN
    + """
local n_fields = tonumber(ARGV[1])
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists and n_fields > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 2, 1 + n_fields)) end
if #KEYS > 1 then end_run(2, 2 + n_fields) end
if exists then return 1 end
return 0
"""
)

# KEYS: record, marker, lease, running zset, hashes...   ARGV: the run's end arguments (see
# _END_RUN). A stream run's end on its own: a run that wrote no record (it crashed, lost its
# claim, or could not reach Redis for its last write). The running-index entry of a request
# that is still not terminal stays, so the sweep resumes it.
END_STREAM_RUN = _COMMON + _END_RUN + "return end_run(2, 1)"

# KEYS: record, lease, seq, events, dispatched-zset, streaming-zset[, taken list]
# ARGV: request id, lease owner, lease ms, now, channel, maxlen, ev_ttl, started event
#       [, the task message to remove from the taken list]
# The stream worker's claim in one round trip: drop the message from the worker's taken list
# (see hybrid_router.workers.stream.engine), take the lease, move dispatched -> streaming, index the request
# as running and return its record. Returns {outcome, ...}:
#   'claimed' + the record's HGETALL; 'mine' + the record's HGETALL (the lease is already this
#   worker's: a claim repeated after a lost reply, or a second delivery to the same worker,
#   which the caller tells apart); 'missing'; 'terminal'; 'duplicate' (a live lease: another worker streams it);
#   'lost' + the record's HGETALL (streaming and nobody held the lease: its worker died; the
#   lease is now ours, the attempt counted, and the caller resumes it); 'other' + status (a
#   state the stream lane does not own; lease released).
CLAIM_STREAM = (
    _COMMON
    + """
if KEYS[7] then redis.call('LREM', KEYS[7], 1, ARGV[9]) end
local function with_record(outcome)
  local out = {outcome}
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields do out[#out + 1] = fields[i] end
  return out
end
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then
  redis.call('ZREM', KEYS[5], ARGV[1])
  return {'missing'}
end
if is_terminal(cur) then
  redis.call('ZREM', KEYS[5], ARGV[1])
  return {'terminal'}
end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', tonumber(ARGV[3])) then
  if cur == 'streaming' and redis.call('GET', KEYS[2]) == ARGV[2] then
    return with_record('mine')
  end
  return {'duplicate'}
end
if cur == 'streaming' then
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1])
  return with_record('lost')
end
if not may_move(cur, 'streaming') then
  redis.call('DEL', KEYS[2])
  return {'other', cur}
end
redis.call('HSET', KEYS[1], 'status', 'streaming', 'started_at', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1])
emit(KEYS[3], KEYS[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return with_record('claimed')
"""
)

# KEYS: seq, events, record, lease
# ARGV: channel, maxlen, ev_ttl, lease owner, parts relayed before these events, parts in them,
#       the events (token / tool_calls)...
# A stream's events, fenced and idempotent. The record counts the parts relayed (tokens and
# tool-call chunks: `content_tokens_relayed`); events are appended only when that count is the
# one their sender last saw, so a publish sent again after a lost reply (Redis restarted,
# connection cut) is not relayed twice, and a run that another worker took over cannot
# interleave its tokens. Returns the last event's seq; 0 when they were already appended (a
# repeat); -1 once the request is terminal (stop streaming); -2 when another worker owns the
# stream (stop, write nothing).
EMIT_TOKENS = (
    _COMMON
    + """
local state = redis.call('HMGET', KEYS[3], 'status', 'content_tokens_relayed')
local cur = state[1]
if (not cur) or is_terminal(cur) then return -1 end
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[4] then return -2 end
local relayed = tonumber(state[2] or '0')
local before, n = tonumber(ARGV[5]), tonumber(ARGV[6])
if relayed == before + n then return 0 end
if relayed ~= before then return -2 end
redis.call('HSET', KEYS[3], 'content_tokens_relayed', before + n)
local seq = 0
for i = 7, #ARGV do seq = emit(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[i]) end
return seq
"""
)

# KEYS: the leases of one worker.   ARGV: owner, lease ms
# Renew each lease this worker holds; take back one that expired while Redis could not be
# reached (nobody else took it). Returns, per lease, 1 (held) or 0 (another worker has it).
RENEW_LEASES = """
local out = {}
for i = 1, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2]))
    out[i] = 1
  elseif not holder then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', tonumber(ARGV[2]))
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: the stream queue, the engine's taken list   ARGV: how many messages at most
# A stream engine's take of what is queued now (hybrid_router.workers.stream.engine): up to ARGV[1] messages
# moved from the consuming end of the queue onto the taken list, oldest first, in one command.
# Why a script: the same moves as pipelined RPOPLPUSHes cost Redis one command each, most of
# them answering nil (a take asks for as many messages as the engine has free slots).
TAKE = """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local message = redis.call('RPOPLPUSH', KEYS[1], KEYS[2])
  if not message then break end
  out[i] = message
end
return out
"""

# KEYS: taken list of a dead engine, its heartbeat, the stream queue, the engines set
# ARGV: the engine's id
# Hand back what a dead stream engine had taken off the queue but not claimed: its messages go
# back to the consuming end of the queue (oldest served first). Only while its heartbeat is
# gone. Returns how many messages went back, or -1 when the engine is alive.
RESTORE_TAKEN = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[3], 'LEFT', 'RIGHT') do n = n + 1 end
redis.call('SREM', KEYS[4], ARGV[1])
return n
"""

# KEYS: record   ARGV: tenant
# The record when it belongs to the tenant, else nil, in one command whatever the case: the
# owner is read first and the record only for its owner, so another tenant's id costs what an
# unknown one does (a large record read whole, then refused, would tell them apart by time).
GET_OWNED = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
return redis.call('HGETALL', KEYS[1])
"""


# KEYS: record, events, seq, due zset   ARGV: request id, digest of the record as read
#   (sha1 of its fields and values, sorted by field, joined by NUL), the log's length as read, then the compact record's
#   fields (field, value, ...)
# The compaction of one finished request (hybrid_router.router.core.replay): the record replaced by its compact
# fields (its TTL kept), its replay log and seq counter deleted, its due entry removed; only
# when the request is terminal and neither record nor log changed since they were read.
# Returns 1 compacted; 2 changed since read (try again later); 0 not terminal (left alone,
# out of the index); -1 no record (log and counter deleted).
COMPACT = (
    _COMMON
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[1])
  return -1
end
if not is_terminal(cur) then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
-- The digest is of the fields sorted by name: a hash table's order may change between reads
-- (incremental rehashing), its content does not.
local flat, names, values = redis.call('HGETALL', KEYS[1]), {}, {}
for i = 1, #flat, 2 do names[#names + 1] = flat[i]; values[flat[i]] = flat[i + 1] end
table.sort(names)
local parts = {}
for _, name in ipairs(names) do parts[#parts + 1] = name; parts[#parts + 1] = values[name] end
if redis.sha1hex(table.concat(parts, '\\0')) ~= ARGV[2] then return 2 end
if redis.call('XLEN', KEYS[2]) ~= tonumber(ARGV[3]) then return 2 end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""
)


CREATE_SCRIPT = LuaScript(CREATE)
TRANSITION_SCRIPT = LuaScript(TRANSITION)
EMIT_SCRIPT = LuaScript(EMIT)
CANCEL_SCRIPT = LuaScript(CANCEL)
CLAIM_STREAM_SCRIPT = LuaScript(CLAIM_STREAM)
ANNOTATE_SCRIPT = LuaScript(ANNOTATE)
GET_OWNED_SCRIPT = LuaScript(GET_OWNED)
END_STREAM_RUN_SCRIPT = LuaScript(END_STREAM_RUN)
EMIT_TOKENS_SCRIPT = LuaScript(EMIT_TOKENS)
RENEW_LEASES_SCRIPT = LuaScript(RENEW_LEASES)
RESTORE_TAKEN_SCRIPT = LuaScript(RESTORE_TAKEN)
TAKE_SCRIPT = LuaScript(TAKE)
COMPACT_SCRIPT = LuaScript(COMPACT)
