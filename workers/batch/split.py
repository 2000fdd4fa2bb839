"""Finding the request at fault when an upstream batch fails as a whole.

A Batch API job that ends `failed` (its input file did not validate) ran none of its lines, and
the upstream's answer need not say which line was at fault. Charging the failure to every
request would let one tenant's bad request use up the attempts of every other tenant's requests
in the same flush. So a failed batch of more than one request is *split*: its requests go back
to the queue without using an attempt, each marked with one of two groups (`halves`), and the
flush puts each group in a batch of its own (`hybrid_router.workers.batch.flush`). A half that succeeds ends
there; a half that fails is split again. A failed batch of one request is that request's own
failure: it uses an attempt and stays alone (`alone`), so after `ROUTER_BATCH_MAX_ATTEMPTS` such
batches it fails with the upstream's reason, and no other request ever shares its batch again.

Cost: a bad line among n requests is found after about log2(n) extra batches, each round one
flush and one poll; every request not in a failing half is done after its first success.
"""

from __future__ import annotations

from collections.abc import Sequence

SPLIT_STATUS = "failed"


def splits(status: str, missing: Sequence[str]) -> bool:
    """True when a batch that ended `status` leaves `missing` to be split (no attempt used)."""
    return status == SPLIT_STATUS and len(missing) > 1


def halves(batch_id: str, ids: Sequence[str]) -> dict[str, str]:
    """The ids' groups after `batch_id` failed as a whole: the first half and the second."""
    middle = (len(ids) + 1) // 2
    return {rid: f"{batch_id}.{0 if i < middle else 1}" for i, rid in enumerate(ids)}


def alone(batch_id: str, ids: Sequence[str]) -> dict[str, str]:
    """Groups that keep each id of a failed batch in a batch of its own from now on."""
    return {rid: f"{batch_id}.{rid}" for rid in ids}
