"""Opaque resource ids with a type prefix (asst_, thread_, msg_, run_, step_)."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    # 96 random bits, lowercase base32-ish hex: unguessable, URL- and shell-safe.
    return f"{prefix}_{secrets.token_hex(12)}"


def has_prefix(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and len(value) > len(prefix) + 1
