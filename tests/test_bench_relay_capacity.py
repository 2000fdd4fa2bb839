"""How the relay benchmark states its capacity: the limit it found, or a lower bound."""

from __future__ import annotations

from bench.bench_relay import capacity_of, capacity_text


def _rows(*levels: tuple[int, bool]) -> list[dict[str, object]]:
    return [{"streams": streams, "ok": ok} for streams, ok in levels]


def test_capacity_is_the_last_level_before_the_first_miss() -> None:
    rows = _rows((100, True), (200, True), (300, False), (400, True))
    assert capacity_of(rows) == 200
    assert capacity_text(rows) == "200"


def test_capacity_when_no_level_was_missed_is_said_to_be_a_lower_bound() -> None:
    rows = _rows((100, True), (600, True))
    assert capacity_of(rows) == 600
    assert capacity_text(rows).startswith("600 or more")


def test_capacity_when_the_first_level_is_missed_is_zero() -> None:
    assert capacity_text(_rows((100, False))) == "0"
