"""What Celery sees of the stream engine's streams: task events, worker state, revokes.

The engine takes ``hr.stream.run`` messages off the queue itself, so Celery's consumer never
sees them. This module makes each stream what a task run by Celery would be:

- **Flower** gets the task events (`hybrid_router.router.core.task_events.TaskEvents`): ``task-received`` and
  ``task-started`` when the engine takes the message, then the request's outcome:
  ``task-succeeded`` (completed), ``task-failed`` with the request's error code and message
  (failed), ``task-revoked`` (cancelled, by the API or a revoke). A delivery that turned out to
  be a duplicate (or of a request already finished) sends no outcome of its own.
- **``celery inspect active``** and Flower's worker page list each running stream: a `StreamRun`
  is registered in Celery's worker state with `celery.worker.state.task_accepted` /
  `task_ready`, which is what those commands read.
- **``celery control revoke ID --terminate``** finds the `StreamRun` there and calls its
  `terminate`, which cancels the request (`hybrid_router.workers.stream.cancel`) and stops its upstream read at
  once; a revoked task still queued is cancelled when the engine takes it (``revoked``: Celery's
  own set of revoked ids, filled by every revoke broadcast).

The task id of a stream is its request id (the intake and the sweep send it so), so the id
Flower shows is the one ``GET /v1/requests/{id}`` reads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from celery.worker import state as worker_state

from hybrid_router.router.core.task_events import TaskEvents
from hybrid_router.workers.stream.abort import UpstreamAbort

# RunOutcome values (`hybrid_router.workers.stream.relay`) whose request this run ended with an error.
FAILED_OUTCOMES = frozenset({"failed", "missing"})


class _StreamTaskType:
    """What Celery's shutdown asks of a request's task: a stream's message is taken off the
    queue when it starts (acknowledged), so Celery never cancels or requeues it."""

    acks_late = True


class StreamRun:
    """One running stream as Celery's worker state sees it (`celery.worker.request.Request`'s
    interface used by ``inspect active``, ``query_task``, ``revoke --terminate`` and shutdown)."""

    task = _StreamTaskType()
    acknowledged = True

    def __init__(self, task_id: str, request_id: str, name: str, args: list[Any],
                 hostname: str | None, terminate: Callable[[str], object]) -> None:
        self.id = task_id
        self.request_id = request_id
        self.name = name
        self.args = args
        self.hostname = hostname
        self.time_start = time.time()
        self.abort = UpstreamAbort()
        self.terminated = False
        self._terminate = terminate

    def info(self, safe: bool = False) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "args": repr(self.args) if safe else self.args,
            "kwargs": "{}" if safe else {}, "type": self.name, "hostname": self.hostname,
            "time_start": self.time_start, "acknowledged": True,
            "delivery_info": {"exchange": "", "routing_key": None, "priority": 0,
                              "redelivered": False},
            "worker_pid": os.getpid(),
        }

    def terminate(self, pool: Any, signal: Any = None) -> None:
        """``revoke --terminate``: cancel the request and stop its stream now (any thread)."""
        self.terminated = True
        self._terminate(self.request_id)

    def cancel(self, pool: Any, emit_retry: bool = True) -> None:
        """Celery's cold shutdown: nothing to do (the stream's lease covers a dying worker)."""

    def __repr__(self) -> str:
        return f"<StreamRun {self.name}[{self.id}]>"


class StreamTaskView:
    """Reports the engine's streams to Celery (see the module doc). Called on the engine loop;
    every call is a queue put or a dict/set update, never I/O."""

    def __init__(self, events: TaskEvents | None, hostname: str | None = None) -> None:
        self.events = events
        self.hostname = hostname

    @staticmethod
    def revoked(task_id: str) -> bool:
        """Whether a revoke for `task_id` reached this worker (Celery's revoked set)."""
        return task_id in worker_state.revoked

    def received_revoked(self, task_id: str, name: str, args: list[Any]) -> None:
        """A message taken off the queue for a task revoked while it waited."""
        self._received(task_id, name, args)
        self._send("task-revoked", uuid=task_id, terminated=False, signum=None, expired=False)

    def started(self, run: StreamRun) -> None:
        worker_state.task_accepted(run)
        self._received(run.id, run.name, run.args)
        self._send("task-started", uuid=run.id)

    def ended(self, run: StreamRun, outcome: str, error: dict[str, Any] | None,
              still_running: bool) -> None:
        """`run` ended with `outcome`; `error` is its request's (code, message) when it failed;
        `still_running` when another delivery of the same task runs here (a duplicate)."""
        if still_running:
            worker_state.active_requests.discard(run)
        else:
            worker_state.task_ready(run, successful=outcome == "completed")
        runtime = time.time() - run.time_start
        if outcome in ("completed", "moved"):  # moved: handed to the batch lane, which ends it
            self._send("task-succeeded", uuid=run.id, result=repr(outcome), runtime=runtime)
        elif outcome == "cancelled":
            self._send("task-revoked", uuid=run.id, terminated=run.terminated,
                       signum=15 if run.terminated else None, expired=False)
        elif outcome in FAILED_OUTCOMES:
            error = error or {}
            message = f"{error.get('code', outcome)}: {error.get('message', '')}".rstrip(": ")
            self._send("task-failed", uuid=run.id, exception=f"StreamFailed({message!r})",
                       traceback="", runtime=runtime)

    def _received(self, task_id: str, name: str, args: list[Any]) -> None:
        self._send("task-received", uuid=task_id, name=name, args=repr(args), kwargs="{}",
                   retries=0, eta=None, expires=None, root_id=task_id, parent_id=None)

    def _send(self, event_type: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.send(event_type, **fields)
