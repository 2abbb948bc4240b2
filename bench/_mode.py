"""Full runs (`make bench`: figures for BENCHMARKS.md) or a smoke run (`make bench-smoke`: every
benchmark end to end in seconds, so CI keeps them working; its figures are thrown away)."""

from __future__ import annotations

SMOKE = False


def sized(full: int, smoke: int) -> int:
    """A count for the current mode: e.g. sized(10_000, 50) events, sized(5, 1) rounds."""
    return smoke if SMOKE else full


def seconds(full: float, smoke: float) -> float:
    """A duration for the current mode."""
    return smoke if SMOKE else full
