"""Opaque page tokens (AIP-158): a cursor bound to the order and filters it was made for."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from spindle.v1 import common_pb2
from spindle_server.api.validation import Validator
from spindle_server.store.base import Page, PageQuery

# Tokens this server issues are about 60 characters; anything much longer is forged.
MAX_TOKEN_CHARS = 512


def _fingerprint(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


def page_query(validator: Validator, page_size: int, page_token: str, order: int, scope: str) -> PageQuery:
    """`scope` names the listing and its filters; a token from another listing is refused."""
    validator.enum("order", order, common_pb2.SortOrder)
    limit = validator.page_size(page_size)
    descending = order != common_pb2.ASC
    after: int | None = None
    if len(page_token) > MAX_TOKEN_CHARS:
        validator.add("page_token", "is not a page token this server issued")
    elif page_token:
        try:
            decoded = json.loads(base64.urlsafe_b64decode(page_token.encode() + b"==").decode())
            after = int(decoded["s"])
            token_descending = bool(decoded["d"])
            token_scope = str(decoded["f"])
            if not 0 <= after < 2**63:
                raise ValueError("cursor out of range")
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError, binascii.Error, UnicodeError):
            validator.add("page_token", "is not a page token this server issued")
        else:
            if token_descending != descending or token_scope != _fingerprint(scope):
                validator.add("page_token", "was issued for a listing with another order or other filters")
    validator.check()
    return PageQuery(limit=limit, after_seq=after, descending=descending)


def next_page_token(page: Page[Any], query: PageQuery, scope: str) -> str:
    if page.next_seq is None:
        return ""
    body = json.dumps(
        {"s": page.next_seq, "d": query.descending, "f": _fingerprint(scope)}, separators=(",", ":")
    )
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
