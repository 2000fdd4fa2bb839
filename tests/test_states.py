"""The request states are defined once (`core.states`); the Lua guards come from it."""

from __future__ import annotations

import re
from itertools import product

import redis

from hybrid_router.router.core import lua as core_lua
from hybrid_router.router.core.states import LUA_STATES, MOVES, TERMINAL, State, is_terminal, may_move
from hybrid_router.workers.batch import lua as batch_lua

STATES = [s.value for s in State]


def test_terminal_states_have_no_moves_and_every_other_state_can_end() -> None:
    for state in State:
        if state in TERMINAL:
            assert MOVES[state] == frozenset()
        else:
            assert {State.COMPLETED, State.FAILED, State.CANCELLED} <= MOVES[state]
    assert is_terminal(b"failed") and is_terminal("cancelled") and not is_terminal("streaming")
    assert not is_terminal(None)


def test_the_lua_guard_answers_what_python_answers(redis_client: redis.Redis) -> None:
    """`may_move` in Lua (what every status-changing script calls) equals the Python table, for
    every pair of states and for a missing record."""
    script = LUA_STATES + """
local out = {}
for i = 1, #ARGV, 2 do
  local from = ARGV[i]
  if from == '' then from = false end
  out[#out + 1] = may_move(from, ARGV[i + 1]) and 1 or 0
end
return out
"""
    pairs = list(product([*STATES, ""], STATES))
    answers = redis_client.eval(script, 0, *[x for pair in pairs for x in pair])
    assert answers == [int(bool(src) and may_move(src, dst)) for src, dst in pairs]
    assert not may_move("completed", "failed") and may_move("queued", "submitted")


def _scripts() -> dict[str, str]:
    return {f"{module.__name__}.{name}": value
            for module in (core_lua, batch_lua) for name, value in vars(module).items()
            if isinstance(value, str) and "redis.call" in value}


def test_every_status_a_script_writes_or_compares_is_a_defined_state() -> None:
    written = re.compile(r"HSET'?, [^\n]*?'status', '(\w+)'")
    compared = re.compile(r"(?:cur|cur\[1\]|to_status) [~=]= '(\w+)'")
    seen = set()
    for name, source in _scripts().items():
        for status in written.findall(source) + compared.findall(source):
            assert status in STATES, f"{name} uses an undefined state {status!r}"
            seen.add(status)
    assert {"submitted", "streaming", "cancelled", "failed", "queued", "dispatched"} <= seen
