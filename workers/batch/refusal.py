"""A batch submission the upstream refuses counts against its requests' attempts.

Why: a claim whose upload or batch create failed is put back for the next flush. That is right
for what passes (no answer, 429, 5xx), but a 4xx that waiting does not cure (a model the Batch
API does not take, a key without batch access, an upstream without a Batch API while
``ROUTER_BATCH_MODE=native``) would send the same requests round every flush, forever, none of
them ever terminal. So each refused submission counts as one of the request's
``ROUTER_BATCH_MAX_ATTEMPTS`` submissions, as a failed or expired batch does, and a request that
has used them fails with the upstream's answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import dumps, now
from hybrid_router.router.core.replay import replay_policy
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.lua import COUNT_REFUSAL_SCRIPT, run_pipelined
from hybrid_router.workers.batch.writeback import LatencyTally, Notify, settle_attempts

log = get_logger(__name__)

REFUSED_CODE = "batch_refused"
COUNT_CHUNK = 1000


@dataclass
class RefusalCount:
    counted: int = 0  # still queued, one attempt more
    failed: int = 0  # had used their attempts: failed with the refusal


def count_refusal(client: redis.Redis, settings: Settings, ids: Sequence[str], reason: str,
                  notify: Notify) -> RefusalCount:
    """Count one refused submission against each still-`queued` request of `ids`; fail those
    that have used their attempts (event, callback, latency). The claim is released after."""
    keys = Keys(settings.key_prefix)
    message = (f"the upstream refused this request's batch {settings.batch_max_attempts} "
               f"times (ROUTER_BATCH_MAX_ATTEMPTS); last answer: {reason}")[:1000]
    error = dumps({"code": REFUSED_CODE, "message": message, "retryable": False})
    event = ev.error(REFUSED_CODE, message, False)
    result = RefusalCount()
    tally = LatencyTally()
    for start in range(0, len(ids), COUNT_CHUNK):
        part = ids[start:start + COUNT_CHUNK]
        finished = now()
        answers = run_pipelined(client, COUNT_REFUSAL_SCRIPT, [(
            [keys.record(rid), keys.seq(rid), keys.events(rid), keys.batch_deadlines()],
            [settings.batch_max_attempts, keys.channel(rid), settings.replay_maxlen,
             replay_policy(settings), settings.result_ttl_s, repr(finished), event, error],
        ) for rid in part])
        counted, failed, _untouched = settle_attempts(part, answers, finished, tally, notify)
        result.counted += counted
        result.failed += failed
    tally.write(client, keys)
    if result.failed:
        log.error("requests failed: the upstream refused their batch every time",
                  failed=result.failed, attempts=settings.batch_max_attempts,
                  reason=reason[:300])
    return result
