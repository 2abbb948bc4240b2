"""Resource ids: a type prefix, then the creation time in milliseconds and 52 random bits, so ids
made later sort after earlier ones (the store's id indexes take them at their end)."""

from __future__ import annotations

import re

import pytest

from spindle_server import ids

ID = re.compile(r"msg_[0-9a-f]{24}")


def test_ids_sort_by_their_millisecond_and_differ_within_one(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_765_000_000_000_000_000]  # nanoseconds: a fixed clock, moved by hand
    monkeypatch.setattr(ids.time, "time_ns", lambda: now[0])
    same_millisecond = [ids.new_id("msg") for _ in range(2000)]
    now[0] += 1_000_000
    later = ids.new_id("msg")
    assert all(ID.fullmatch(made) for made in [*same_millisecond, later])
    assert len(set(same_millisecond)) == len(same_millisecond)  # the random part
    assert {made[:15] for made in same_millisecond} == {f"msg_{1_765_000_000_000:011x}"}
    assert later[:15] == f"msg_{1_765_000_000_001:011x}" and later > max(same_millisecond)


def test_ids_keep_their_width_until_the_clock_needs_a_twelfth_digit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids.time, "time_ns", lambda: (16**11 - 1) * 1_000_000)  # the year 2527
    assert ID.fullmatch(ids.new_id("msg"))
    assert ids.has_prefix(ids.new_id("run"), "run")
