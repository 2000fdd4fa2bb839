"""One error taxonomy (`core.errors`); its HTTP mapping lives only at the API boundary."""

from __future__ import annotations

import inspect

from hybrid_router.router.api.errors import HTTP_STATUS, status_of
from hybrid_router.router.core import errors
from hybrid_router.router.core.errors import ErrorCode, RouterRefusal
from hybrid_router.router.core.stream_url import StreamTokenError


def test_every_refusal_has_one_http_status() -> None:
    kinds = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
             if issubclass(cls, RouterRefusal) and cls is not RouterRefusal]
    assert len(kinds) >= 8
    assert set(kinds) == set(HTTP_STATUS)
    assert status_of(StreamTokenError("x")) == 401  # a subclass takes its parent's status
    assert len(set(HTTP_STATUS.values())) == len(HTTP_STATUS)


def test_a_refusal_carries_a_code_of_the_enum_and_no_status() -> None:
    refusal = errors.Conflict("idempotency key reused", param="idempotency_key")
    assert refusal.code is ErrorCode.IDEMPOTENCY_CONFLICT and refusal.param == "idempotency_key"
    assert isinstance(refusal, RouterRefusal) and not hasattr(refusal, "status")
    assert StreamTokenError("bad").code is ErrorCode.INVALID_STREAM_TOKEN
