"""OpenAI's cursor lists (after/before an object id, limit, order) over Spindle's page tokens.

A servicer List is the one listing; this only positions it. The token that continues after the
last item of a served page is remembered, so the SDK's auto-pagination (after=<last id>) is one
servicer call per page; an unknown `after` (another process served the page before) walks the
listing from its start.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeAlias, TypeVar

from spindle.v1 import common_pb2
from spindle_server.compat.openai.parse import bad

T = TypeVar("T")
Order: TypeAlias = common_pb2.SortOrder.ValueType
Fetch = Callable[[int, str, Order], Awaitable[tuple[list[T], str]]]

WALK_PAGE = 100
MAX_LIMIT = 100
REMEMBERED = 10_000


class Cursors:
    """Tokens that continue a listing after an item: (project, scope, order, id) -> token."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._tokens: OrderedDict[tuple[str, str, Order, str], str] = OrderedDict()
        self._size = size

    def get(self, key: tuple[str, str, Order, str]) -> str | None:
        token = self._tokens.get(key)
        if token is not None:
            self._tokens.move_to_end(key)
        return token

    def put(self, key: tuple[str, str, Order, str], token: str) -> None:
        self._tokens[key] = token
        self._tokens.move_to_end(key)
        while len(self._tokens) > self._size:
            self._tokens.popitem(last=False)


class ListParams:
    def __init__(self, query: dict[str, str]) -> None:
        limit_text = query.get("limit", "20")
        try:
            self.limit = int(limit_text)
        except ValueError:
            raise bad("limit", "must be an integer") from None
        if not 1 <= self.limit <= MAX_LIMIT:
            raise bad("limit", f"must be between 1 and {MAX_LIMIT}")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad("order", "must be asc or desc")
        self.order = common_pb2.ASC if order == "asc" else common_pb2.DESC
        self.after = query.get("after") or None
        self.before = query.get("before") or None
        if self.after and self.before:
            raise bad("before", "give after or before, not both")


async def _walk(fetch: Fetch[T], order: Order) -> AsyncIterator[T]:
    token = ""
    while True:
        items, token = await fetch(WALK_PAGE, token, order)
        for item in items:
            yield item
        if not token:
            return


async def cursor_page(
    fetch: Fetch[T],
    id_of: Callable[[T], str],
    params: ListParams,
    cursors: Cursors,
    project: str,
    scope: str,
) -> tuple[list[T], bool]:
    """One page of items and whether more follow."""
    limit, order = params.limit, params.order
    if params.before:
        preceding: deque[T] = deque(maxlen=limit + 1)  # the nearest ones, and one to tell has_more
        async for item in _walk(fetch, order):
            if id_of(item) == params.before:
                return list(preceding)[-limit:], len(preceding) > limit
            preceding.append(item)
        raise bad("before", f"{params.before!r} is not in this list")
    token = ""
    if params.after:
        remembered = cursors.get((project, scope, order, params.after))
        if remembered is None:
            return await _page_after_walk(fetch, id_of, params.after, limit, order)
        token = remembered
    items, next_token = await fetch(limit, token, order)
    if items and next_token:
        cursors.put((project, scope, order, id_of(items[-1])), next_token)
    return items, bool(next_token)


async def _page_after_walk(
    fetch: Fetch[T], id_of: Callable[[T], str], after: str, limit: int, order: Order
) -> tuple[list[T], bool]:
    found = False
    page: list[T] = []
    async for item in _walk(fetch, order):
        if found:
            if len(page) == limit:
                return page, True
            page.append(item)
        elif id_of(item) == after:
            found = True
    if not found:
        raise bad("after", f"{after!r} is not in this list")
    return page, False
