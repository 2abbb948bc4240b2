"""The SQLite store's cache of run bodies (store/sqlite_cache.py) on its own: its bounds, and the
protocol with the writer (no answer while a batch is in flight, no fill across a batch)."""

from __future__ import annotations

from spindle_server.store.sqlite_cache import BodyCache


def test_entries_are_bounded_oldest_dropped_first() -> None:
    cache = BodyCache(max_entries=3, max_bytes=1 << 20)
    for n in range(5):
        assert cache.fill(n, b"body%d" % n, cache.generation)
    assert len(cache) == 3
    assert [cache.get(n) for n in range(5)] == [None, None, b"body2", b"body3", b"body4"]
    assert cache.size_bytes == 3 * len(b"body2")


def test_bytes_are_bounded() -> None:
    cache = BodyCache(max_entries=100, max_bytes=1600)
    for n in range(30):
        assert cache.fill(n, bytes(100), cache.generation)
    assert cache.size_bytes <= 1600 and len(cache) == 16
    assert cache.get(29) is not None and cache.get(13) is None


def test_a_refill_replaces_and_counts_once() -> None:
    cache = BodyCache(max_entries=10, max_bytes=1600)
    cache.fill("run", bytes(50), cache.generation)
    cache.fill("run", bytes(80), cache.generation)
    assert len(cache) == 1 and cache.size_bytes == 80


def test_a_body_over_a_sixteenth_of_the_bytes_is_not_kept() -> None:
    cache = BodyCache(max_entries=10, max_bytes=1600)
    assert not cache.fill("big", bytes(101), cache.generation)
    assert cache.fill("fits", bytes(100), cache.generation)
    assert cache.get("big") is None and cache.size_bytes == 100


def test_nothing_is_answered_while_a_batch_is_in_flight_and_all_is_dropped_after() -> None:
    cache = BodyCache()
    cache.fill("run", b"old", cache.generation)
    cache.writing()
    assert cache.get("run") is None
    assert not cache.fill("run", b"read during the batch", cache.generation)
    cache.written()
    assert cache.get("run") is None and len(cache) == 0 and cache.size_bytes == 0


def test_a_read_that_a_batch_overlapped_is_not_kept() -> None:
    cache = BodyCache()
    began = cache.generation  # the read begins
    cache.writing()
    cache.written()  # a whole batch ran while it read
    assert not cache.fill("run", b"maybe old", began)
    began = cache.generation
    assert cache.fill("run", b"new", began)
    assert cache.get("run") == b"new"


def test_a_closed_cache_keeps_and_answers_nothing_even_after_a_last_batch() -> None:
    cache = BodyCache()
    cache.fill("run", b"body", cache.generation)
    cache.close()
    assert cache.get("run") is None
    cache.writing()
    cache.written()  # the writer's last batches, after close began
    assert not cache.fill("run", b"body", cache.generation)
    assert cache.get("run") is None
