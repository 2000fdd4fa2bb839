"""Celery task events sent by hand, off the hot path, for what Celery itself does not see.

The stream engine takes its task messages off the queue itself and the intake writes them in a
Lua script, so neither goes through Celery's own send or receive path, and neither would show in
Flower. Both report what happened as the Celery task events Celery would have sent
(``task-sent`` from the intake, ``task-received`` ... ``task-succeeded`` / ``task-failed`` /
``task-revoked`` from the engine). A Celery event is a synchronous Redis publish, so events are
queued (`TaskEvents.send` is a queue put) and sent from a thread of their own, a batch per
wake-up, as one ``task.multi`` message.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery

from hybrid_router.router.core.logs import get_logger

log = get_logger(__name__)

EVENT_BATCH_S = 0.05
# Sends Celery task events, a batch at a time: [(event type, fields), ...].
EventSink = Callable[[list[tuple[str, dict[str, Any]]]], None]


class TaskEvents:
    """Forwards task events from a thread of its own (nobody on the hot path waits for one),
    a batch per wake-up."""

    def __init__(self, sink: EventSink, name: str = "task-events",
                 batch_s: float = EVENT_BATCH_S) -> None:
        self._sink = sink
        self._batch_s = batch_s
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a short script's last events still go out

    def send(self, event_type: str, **fields: Any) -> None:
        self._queue.put((event_type, fields))

    def close(self) -> None:
        """Send what is queued, then stop the thread (again: nothing)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(5)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            # Gather what arrives within a short window, so this thread wakes (and takes the
            # GIL from the loop) once per burst of stream starts rather than once per event.
            time.sleep(self._batch_s)
            batch = [first]
            while not self._queue.empty():
                batch.append(self._queue.get())
            events = [item for item in batch if item is not None]
            if events:
                try:
                    self._sink(events)
                except Exception as exc:  # Flower is a view; nobody waits or fails for it
                    log.warning("sending task events failed", events=len(events), error=str(exc))
            if len(events) < len(batch):
                return


def celery_event_sink(app: Celery, hostname: str | None = None) -> EventSink:
    """Sends Celery task events as `hostname` (a worker's node name; Celery's anonymous
    producer name when None): each batch is buffered by Celery's own dispatcher and published
    as one ``task.multi`` message (one Redis round trip; Celery's event receiver, hence Flower,
    reads such lists). One dispatcher, made on first use and again after a failure."""
    dispatcher: Any = None

    def send(events: list[tuple[str, dict[str, Any]]]) -> None:
        nonlocal dispatcher
        if dispatcher is None:
            dispatcher = app.events.Dispatcher(app.connection_for_write(), hostname=hostname,
                                               enabled=True, buffer_group={"task"},
                                               buffer_limit=1_000_000)
        try:
            for event_type, fields in events:
                dispatcher.send(event_type, **fields)
            dispatcher.flush(errors=False)
        except Exception:
            dispatcher = None
            raise

    return send
