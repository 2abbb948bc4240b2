"""Retry policy, jittered exponential backoff and wall-clock deadlines.

The pure pieces here (:class:`RetryPolicy`, :class:`Backoff`, :class:`Deadline`) decide *whether*
and *how long*; ``spindle._transport`` does the sleeping, with ``time.sleep`` or ``asyncio.sleep``.
Every call of the client is safe to retry: reads are idempotent and every mutation carries a
``request_id`` that stays the same across the retries of one logical call.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from spindle.errors import ApiError

__all__ = ["DEFAULT_RETRY", "NO_RETRY", "Backoff", "Deadline", "RetryPolicy", "is_reset_stream"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often to retry a failed call.

    Attributes:
        initial: first delay in seconds.
        maximum: the delay never grows beyond this.
        multiplier: each delay is the previous one times this (before jitter).
        jitter: the share of each delay that is random: 0.5 means uniformly in [d/2, d].
        max_attempts: attempts of one call in all (0: no limit but the call's deadline).
        codes: status codes worth retrying. ``ABORTED`` with reason ``REQUEST_IN_PROGRESS`` (the
            first try of the same request_id is still being served) is always retried too; with
            ``UNAVAILABLE`` in them, so is a stream a proxy reset mid-call (``is_reset_stream``).
    """

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int = 0
    codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def backoff(self, rng: random.Random | None = None) -> Backoff:
        """A fresh sequence of delays for one call."""
        return Backoff(self, rng or random.Random())

    def is_retryable(self, error: ApiError) -> bool:
        """True if a call that failed with ``error`` is worth another try under this policy."""
        if error.code in self.codes:
            return True
        if grpc.StatusCode.UNAVAILABLE in self.codes and is_reset_stream(error):
            return True
        return error.code == grpc.StatusCode.ABORTED and error.reason == "REQUEST_IN_PROGRESS"


def is_reset_stream(error: ApiError) -> bool:
    """The call's HTTP/2 stream was reset by the peer with no gRPC status: a proxy (nginx) whose
    replica went away mid-call. grpc reports it as INTERNAL, but it is a dropped connection seen
    through the proxy, as UNAVAILABLE is without one; a server's own INTERNAL carries a reason."""
    return error.code == grpc.StatusCode.INTERNAL and not error.reason and "RST_STREAM" in error.message


DEFAULT_RETRY = RetryPolicy()
"""Retry UNAVAILABLE from 0.1 s up to 5 s between tries, until the call's deadline."""

NO_RETRY = RetryPolicy(max_attempts=1, codes=frozenset())
"""Never retry."""


class Backoff:
    """Jittered exponential delays: ``initial``, ``initial * multiplier``, ... capped at ``maximum``."""

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._base = policy.initial
        self.attempts = 0

    def next_delay(self) -> float:
        """The next delay (and count the attempt it follows)."""
        self.attempts += 1
        base = self._base
        self._base = min(self._base * self._policy.multiplier, self._policy.maximum)
        jitter = self._policy.jitter
        return base * (1.0 - jitter) + self._rng.uniform(0.0, base * jitter)

    def reset(self) -> None:
        """Start again from ``initial`` (after a call made progress)."""
        self._base = self._policy.initial
        self.attempts = 0

    def exhausted(self) -> bool:
        """True once ``max_attempts`` tries were made."""
        limit = self._policy.max_attempts
        return bool(limit) and self.attempts + 1 >= limit


class Deadline:
    """A wall-clock deadline on the monotonic clock; ``None`` seconds means no deadline."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = math.inf if seconds is None else clock() + max(seconds, 0.0)

    @property
    def unlimited(self) -> bool:
        """True without a deadline."""
        return self._at == math.inf

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a deadline."""
        if self.unlimited:
            return None
        return max(self._at - self._clock(), 0.0)

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self._clock() >= self._at

    def cap(self, seconds: float | None) -> float | None:
        """``seconds`` cut to what is left (None: what is left)."""
        left = self.remaining()
        if seconds is None:
            return left
        return seconds if left is None else min(seconds, left)

    def fits(self, delay: float) -> bool:
        """True if sleeping ``delay`` seconds still leaves time for another try."""
        left = self.remaining()
        return left is None or delay < left


def retry_delay(policy: RetryPolicy, backoff: Backoff, deadline: Deadline, error: ApiError) -> float | None:
    """How long to sleep before retrying after ``error``, or None to give up and raise it."""
    if not policy.is_retryable(error) or backoff.exhausted():
        return None
    delay = backoff.next_delay()
    return delay if deadline.fits(delay) else None
