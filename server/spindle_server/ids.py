"""Opaque resource ids with a type prefix (asst_, thread_, msg_, run_, step_)."""

from __future__ import annotations

import os
import time

# 24 lowercase hex characters after the prefix: the creation time in milliseconds (44 bits, 11
# characters: until the year 2527), then 52 random bits from the OS's CSPRNG (13 characters).
# Time first, so new ids sort after older ones: each table's UNIQUE index on id then takes new
# ids at its end, in the pages the last commits wrote, where 96 random bits put every insert in
# a random page of an index larger than SQLite's page cache (a durable Create's commit wrote
# one page of it per message, read from the file first; BENCHMARKS.md, rpc-speed). 52 bits
# within one millisecond stay unguessable, and colliding needs two ids made in the same
# millisecond to draw the same 52 bits.


def new_id(prefix: str) -> str:
    # 7 random bytes are 14 hex characters; the first is dropped.
    return f"{prefix}_{time.time_ns() // 1_000_000:011x}{os.urandom(7).hex()[1:]}"


def has_prefix(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and len(value) > len(prefix) + 1
