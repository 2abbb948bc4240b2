"""Iterate a listing page by page, following ``next_page_token`` until it is empty."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
Page = tuple[Sequence[T], str]
"""The items of one page and the token of the next one ("" on the last)."""


def iterate(fetch: Callable[[str], Page[T]], limit: int | None = None) -> Iterator[T]:
    """Items of every page, lazily (the first call happens at the first ``next()``); with a
    ``limit``, no page is fetched once that many items were given."""
    token = ""
    count = 0
    while limit is None or count < limit:
        items, token = fetch(token)
        for item in items[: None if limit is None else limit - count]:
            count += 1
            yield item
        if not token:
            return


async def aiterate(fetch: Callable[[str], Awaitable[Page[T]]], limit: int | None = None) -> AsyncIterator[T]:
    """Async twin of :func:`iterate`."""
    token = ""
    count = 0
    while limit is None or count < limit:
        items, token = await fetch(token)
        for item in items[: None if limit is None else limit - count]:
            count += 1
            yield item
        if not token:
            return
