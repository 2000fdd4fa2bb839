"""The request states and the moves between them: the one definition.

DESIGN.md: ``queued`` -> ``submitted`` -> terminal on the batch lane, ``dispatched`` ->
``streaming`` -> terminal on the stream lane; a batch request whose deadline can no longer be met
by a batch moves ``queued`` -> ``dispatched``, and one whose batch failed goes back to
``queued``. A terminal state never changes again.

The Python checks use `TERMINAL` and `may_move`; every Lua script that changes a status starts
from `LUA_STATES` (the same table, written as Lua), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Literal


class State(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    DISPATCHED = "dispatched"
    STREAMING = "streaming"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


Status = Literal["queued", "submitted", "dispatched", "streaming", "completed", "failed",
                 "cancelled"]

TERMINAL: frozenset[str] = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})
TERMINAL_BYTES: frozenset[bytes] = frozenset(s.encode() for s in TERMINAL)

_ENDS = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})

# Every allowed move, from -> to. A stream run that another worker took over stays
# ``streaming`` (the claim re-takes it); a batch that failed puts its requests back in ``queued``.
MOVES: Mapping[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.SUBMITTED, State.DISPATCHED}) | _ENDS,
    State.SUBMITTED: frozenset({State.QUEUED}) | _ENDS,
    State.DISPATCHED: frozenset({State.STREAMING}) | _ENDS,
    State.STREAMING: frozenset({State.STREAMING}) | _ENDS,
    State.COMPLETED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}


def is_terminal(status: str | bytes | None) -> bool:
    """A status that never changes again (a missing record counts as not terminal)."""
    if isinstance(status, bytes):
        return status in TERMINAL_BYTES
    return status in TERMINAL


def may_move(current: str, to: str) -> bool:
    """Whether a request in `current` may move to `to` (the Lua guards answer the same)."""
    try:
        return State(to) in MOVES[State(current)]
    except ValueError:
        return False


def _lua_states() -> str:
    terminal = " or ".join(f"s == '{s}'" for s in sorted(TERMINAL))
    rows = ", ".join(
        f"{src.value} = {{{', '.join(f'{dst.value} = true' for dst in sorted(dsts))}}}"
        for src, dsts in MOVES.items()
    )
    return f"""
local function is_terminal(s)
  return {terminal}
end
local MOVES = {{{rows}}}
local function may_move(from, to)
  local allowed = MOVES[from]
  return allowed ~= nil and allowed[to] == true
end
"""


LUA_STATES = _lua_states()
