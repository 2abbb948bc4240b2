"""Retention: a periodic sweep deletes runs that finished longer ago than --retention.

Each sweep deletes in batches of BATCH_RUNS runs (with their events and steps), one store write
each, so the single writer is never held long and other writes interleave. After a sweep that
deleted something it asks the store to fold its write-ahead log back (a quiet moment: the
deletions just committed), so the database and its WAL stop growing under steady load: the
pages freed by deleted runs are reused by new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog

from spindle_server import clock, faults

log = structlog.get_logger("spindle.retention")

BATCH_RUNS = 32
MIN_INTERVAL_SECONDS = 0.05
MAX_INTERVAL_SECONDS = 60.0


class RetentionStore(Protocol):
    async def delete_expired_runs(self, before: float, limit: int) -> int: ...
    async def checkpoint_wal(self) -> bool: ...


def sweep_interval(retention: float) -> float:
    """A tenth of the retention, between 50 ms and a minute: a run outlives it by at most that."""
    return min(max(retention / 10, MIN_INTERVAL_SECONDS), MAX_INTERVAL_SECONDS)


class RetentionSweeper:
    def __init__(self, store: RetentionStore, retention: float, *, batch: int = BATCH_RUNS) -> None:
        self._store = store
        self.retention = retention
        self.interval = sweep_interval(retention)
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sweep(self) -> int:
        """Delete every run finished before now - retention; returns how many."""
        before = clock.now() - self.retention
        deleted = 0
        while True:
            count = await self._store.delete_expired_runs(before, self._batch)
            deleted += count
            if count < self._batch:
                break
        if deleted:
            checkpointed = await self._store.checkpoint_wal()
            log.debug("retention_swept", runs=deleted, wal_checkpointed=checkpointed)
        return deleted

    async def _loop(self) -> None:
        while True:
            try:
                if faults.ENABLED:
                    await faults.reached("retention.sweep")  # tests hold it to steer sweeps
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: try again at the next tick
                log.warning("retention_sweep_failed", error=str(exc))
            await asyncio.sleep(self.interval)
