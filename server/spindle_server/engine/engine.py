"""The engine: claims PENDING runs, executes them, expires and recovers the rest.

One claim loop takes queued runs (woken by the API, or by a periodic check for runs other
replicas queued) up to `max_concurrent_runs`; each runs as a task under a renewed lease.
A sweeper expires runs past their deadline and takes over runs whose lease ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import secrets
import socket
from collections.abc import Awaitable, Sequence

import structlog

from spindle.v1 import message_pb2, run_pb2
from spindle_server import clock, faults
from spindle_server.engine import transitions
from spindle_server.engine.config import EngineConfig
from spindle_server.engine.executor import CANCEL_BY_USER, CANCEL_LOST_RUN, CANCEL_SHUTDOWN, TurnExecutor
from spindle_server.models.registry import ModelRegistry
from spindle_server.store.base import (
    LEASE_OWNER_SEPARATOR,
    ClaimedRun,
    MutationResult,
    RequestKey,
    RunClaim,
    Store,
)
from spindle_server.store.errors import NotFoundError, StateError

log = structlog.get_logger(__name__)

PURGE_INTERVAL_SECONDS = 60.0


class Engine:
    def __init__(self, store: Store, models: ModelRegistry, config: EngineConfig) -> None:
        self.config = config
        self.replica = config.replica_id or secrets.token_hex(6)
        # The lease owner: the replica, then this incarnation of it (a restart is a new owner).
        incarnation = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.owner = f"{self.replica}{LEASE_OWNER_SEPARATOR}{incarnation}"
        self._store = store
        self._executor = TurnExecutor(store, models, config)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Why a run's task is being stopped from outside. Recorded before the task is told, and
        # read by the task itself: a task cancelled before its first step never runs its
        # coroutine, so a bare task.cancel() could skip the run's final write.
        self._cancel_reasons: dict[str, str] = {}
        self._started: set[str] = set()  # runs whose task has entered its body
        self._wakeup = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._next_purge = 0.0
        # Runs being claimed by their Create (create_run): each holds a slot until spawned.
        self._admitting: set[asyncio.Task[MutationResult]] = set()
        # Runs may be queued that this replica has not claimed (a Create found no free slot, a
        # run was re-queued): until the claim loop has drained the queue, Creates queue too,
        # so a new run never overtakes one that waits.
        self._backlog = True
        self._queued = 0  # counts runs queued for the claim loop: it clears _backlog only if none came
        self._context = contextvars.copy_context()  # run tasks start from the engine's, not a call's

    @property
    def running(self) -> int:
        return len(self._tasks)

    def _claim_at_create(self) -> bool:
        if self._stopping or self._backlog or not self._loops:
            return False
        if faults.ENABLED and faults.configured("store.claim"):
            return False  # a test holds the claim loop: queued runs must stay PENDING
        return len(self._tasks) + len(self._admitting) < self.config.max_concurrent_runs

    async def create_run(
        self,
        project: str,
        run: run_pb2.Run,
        messages: Sequence[message_pb2.Message],
        deadline: float,
        events: Sequence[run_pb2.StreamEvent],
        *,
        record: RequestKey | None = None,
        max_active_runs: int | None = None,
    ) -> MutationResult:
        """Store.insert_run for RunService.Create. With a free execution slot and no queued
        run waiting, the run is claimed in the same transaction (one durable commit less
        between Create and the first delta, and no claim-loop round) and its task spawned at
        once; otherwise it is queued and the claim loop woken."""
        if not self._claim_at_create():
            self._note_queued()  # this run waits for the claim loop
            try:
                return await self._store.insert_run(
                    project, run, messages, deadline, events, record=record, max_active_runs=max_active_runs
                )
            finally:
                self.wake()
        claim = RunClaim(
            self.owner,
            self.config.lease_seconds,
            transitions.start(clock.now(), self.config.run_timeout, self.config.max_attempts),
        )
        insert = self._store.insert_run(
            project,
            run,
            messages,
            deadline,
            events,
            record=record,
            max_active_runs=max_active_runs,
            claim=claim,
        )
        # The run's task waits for this Create to resume and send its answer: the client's
        # Listen, which follows that answer, is the longer path to the first delta, so it
        # starts first (the task's reads and first write come right after, in the same round).
        answered = asyncio.get_running_loop().create_future()
        # A task of its own, shielded: a Create cancelled by its client while the write is
        # queued still commits a claimed run, which must get its executor.
        admitting = asyncio.create_task(self._admit(insert, answered))
        self._admitting.add(admitting)  # the slot is taken now: concurrent Creates see it
        admitting.add_done_callback(self._admitted)
        try:
            return await asyncio.shield(admitting)
        finally:  # answered, failed or cancelled: the task need not wait any longer
            answered.set_result(None)

    def _admitted(self, task: asyncio.Task[MutationResult]) -> None:
        self._admitting.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its Create, if still waiting, raises it

    async def _admit(
        self, insert: Awaitable[MutationResult], answered: asyncio.Future[None]
    ) -> MutationResult:
        if faults.ENABLED:  # held here, the Create's client can give up before the commit
            await faults.reached("engine.before_create_insert")
        result = await insert
        if result.claimed is not None:
            # Spawned now, not when its Create resumes: the slot must pass from _admitting to
            # _tasks with nothing in between, and a cancelled Create must still get its run.
            self._spawn(result.claimed, answered)
        return result

    async def start(self) -> None:
        released = await self._store.release_all_leases(self.replica + LEASE_OWNER_SEPARATOR)
        if released:
            log.info("runs_to_recover", count=released)
        log.info("engine_started", replica=self.replica, owner=self.owner)
        self._context = contextvars.copy_context()
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="engine-claim"),
            asyncio.create_task(self._sweep_loop(), name="engine-sweep"),
        ]

    def wake(self) -> None:
        """A run was queued: claim it now rather than at the next periodic check."""
        self._note_queued()
        self._wakeup.set()

    def _note_queued(self) -> None:
        self._backlog = True
        self._queued += 1

    def cancel_local(self, run_id: str, reason: str = CANCEL_BY_USER) -> bool:
        """Stop this process's task of a run. A task not yet started only learns the reason (it
        reads it first thing); a started one is cancelled, once: its final write is shielded, and
        a second cancel would only make the task end before that write does."""
        task = self._tasks.get(run_id)
        if task is None or task.done():
            return False
        if run_id in self._cancel_reasons:
            return True  # already being stopped
        self._cancel_reasons[run_id] = reason
        if run_id in self._started:
            task.cancel()
        return True

    async def stop(self, grace: float) -> None:
        """Stop claiming; give running turns `grace` seconds, then re-queue what is left."""
        self._stopping = True
        self._wakeup.set()
        self._stop_event.set()
        # Creates claiming their run now spawn it when their commit is answered: wait for them,
        # so those runs get the grace period and are re-queued below like the rest.
        if self._admitting:
            await asyncio.wait(list(self._admitting), timeout=grace)
        # Let the loops finish their round rather than cancel them: a claim cancelled while its
        # write is queued still commits, and the runs it took would be left IN_PROGRESS with no
        # task until the next start (which would count a lost attempt). Runs claimed now are
        # spawned, get the grace period and are re-queued below like the rest.
        if self._loops:
            _, late = await asyncio.wait(self._loops, timeout=grace)
            for loop_task in late:  # stuck on the store: give up on them
                loop_task.cancel()
            await asyncio.gather(*self._loops, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=grace)
        for run_id in list(self._tasks):
            self.cancel_local(run_id, CANCEL_SHUTDOWN)
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # ---- claiming ------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            free = self.config.max_concurrent_runs - len(self._tasks)
            claimed: list[ClaimedRun] = []
            drained = False  # the claim took fewer than it could: nothing else was queued
            # Cleared before the state is looked at, whether or not a slot is free: a wake-up
            # left set with every slot taken would turn the wait below into a busy loop.
            self._wakeup.clear()
            if free > 0:
                queued = self._queued
                try:
                    claimed = await self._store.claim_runs(
                        self.owner,
                        self.config.lease_seconds,
                        min(free, 32),
                        transitions.start(clock.now(), self.config.run_timeout, self.config.max_attempts),
                    )
                    drained = len(claimed) < min(free, 32)
                    if drained and self._queued == queued:
                        self._backlog = False  # nothing left queued as of that claim
                except Exception:
                    log.exception("claim_failed")
            else:
                self._backlog = True  # no slot free: runs may queue meanwhile
            for claim in claimed:
                if claim.run.status == run_pb2.IN_PROGRESS:
                    self._spawn(claim)
                else:  # claimed only to be ended: its attempts were used up
                    log.info("run_not_started", run_id=claim.run.id, error=claim.run.last_error.message)
            # Claim again at once only if more may be waiting (a wake-up since is not lost: it
            # left the event set); a claim that found nothing costs a transaction on the writer.
            if drained or len(claimed) == 0 or len(self._tasks) >= self.config.max_concurrent_runs:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.config.idle_poll_interval)

    def _spawn(self, claim: ClaimedRun, answered: asyncio.Future[None] | None = None) -> None:
        """Start the run's task. `answered`: the run was claimed by its Create, whose answer
        the task lets go first (resolved when that Create resumes)."""
        run_id = claim.run.id
        task = asyncio.create_task(
            self._run(claim, answered), name=f"run-{run_id}", context=self._context.copy()
        )
        self._tasks[run_id] = task
        # A done callback runs however the task ends, even cancelled before its first step.
        task.add_done_callback(functools.partial(self._forget, run_id))

    def _forget(self, run_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(run_id) is task:
            del self._tasks[run_id]
            self._cancel_reasons.pop(run_id, None)
            self._started.discard(run_id)
        if self._backlog:  # a slot is free for a queued run; with none queued, nothing to claim
            self._wakeup.set()

    async def _run(self, claim: ClaimedRun, answered: asyncio.Future[None] | None) -> None:
        run_id = claim.run.id
        if answered is not None:
            # Before _started: a stop meanwhile only records its reason, which execute() reads.
            await answered
        # No await before execute() enters its try: from here on a cancel lands where it is handled.
        self._started.add(run_id)
        # The first renewal is a third of a lease away: a timer until then, and a renewing task
        # only for a run that lasts that long (most runs end first: no task to make and cancel).
        renewer: list[asyncio.Task[None]] = []
        interval = self.config.lease_seconds / 3
        timer = asyncio.get_running_loop().call_later(
            interval, lambda: renewer.append(asyncio.create_task(self._renew_lease(claim, interval)))
        )
        try:
            await self._executor.execute(claim, self._cancel_reasons, new=answered is not None)
        except Exception:
            # Its end could not be written (the store failed too). The lease is no longer
            # renewed, so the sweeper takes the run over once it runs out.
            log.exception("run_task_failed", run_id=run_id)
        finally:
            timer.cancel()
            for task in renewer:
                task.cancel()

    async def _renew_lease(self, claim: ClaimedRun, interval: float) -> None:
        """Renews the lease now, then every `interval`, until it is lost or the task cancelled."""
        while True:
            if faults.ENABLED:  # held here, a stalled replica's executor writes before it learns
                await faults.reached("engine.before_lease_renewal")
            try:
                still_ours = await self._store.renew_lease(
                    claim.run.id, self.owner, claim.epoch, self.config.lease_seconds
                )
            except Exception:
                log.exception("lease_renewal_failed", run_id=claim.run.id)
                still_ours = True  # tried again at the next interval
            if not still_ours:
                log.warning("lease_lost", run_id=claim.run.id, epoch=claim.epoch)
                self.cancel_local(claim.run.id, CANCEL_LOST_RUN)
                return
            await asyncio.sleep(interval)

    # ---- deadlines and recovery ------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while not self._stopping:
            try:
                await self.sweep()
            except Exception:
                log.exception("sweep_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), self.config.sweep_interval)

    async def sweep(self) -> None:
        now = clock.now()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL_SECONDS
            await self._store.purge_requests(now - self.config.request_id_ttl)
        due = await self._store.due_runs(now, 100)
        for run_id in due.expired:
            await self._expire(run_id)
        for run_id in due.orphaned:
            if self._stopping or len(self._tasks) >= self.config.max_concurrent_runs:
                break  # the rest wait for a free slot (their leases stay expired)
            if run_id not in self._tasks:
                await self._recover(run_id)

    async def _expire(self, run_id: str) -> None:
        try:
            _, run = await self._store.get_run_any_project(run_id)
            tool_step = await pending_tool_step(self._store, run)
            await self._store.mutate_run(run_id, transitions.expire(clock.now(), tool_step))
        except (StateError, NotFoundError):
            return
        log.info("run_expired", run_id=run_id)
        self.cancel_local(run_id, CANCEL_LOST_RUN)

    async def _recover(self, run_id: str) -> None:
        if faults.ENABLED:  # held here, this replica does not take orphaned runs over
            await faults.reached("engine.before_reclaim")
        try:
            claim = await self._store.reclaim_run(
                run_id,
                self.owner,
                self.config.lease_seconds,
                transitions.recover(clock.now(), self.config.max_attempts),
            )
        except (StateError, NotFoundError):
            return
        if claim is None:
            return
        log.info("run_recovered", run_id=run_id, status=run_pb2.RunStatus.Name(claim.run.status))
        if claim.run.status == run_pb2.IN_PROGRESS:
            self._spawn(claim)


async def pending_tool_step(store: Store, run: run_pb2.Run) -> run_pb2.RunStep | None:
    """The step of a TOOL_CALLS run's pending calls, read from the store; None in other statuses."""
    if run.status != run_pb2.TOOL_CALLS:
        return None
    return find_tool_step(await store.run_steps(run.id), run)


def find_tool_step(steps: list[run_pb2.RunStep], run: run_pb2.Run) -> run_pb2.RunStep | None:
    """The TOOL_CALLS step that holds the run's pending calls."""
    pending = {call.id for call in run.required_tool_calls}
    for step in reversed(steps):
        if step.type == run_pb2.RunStep.TOOL_CALLS and {c.id for c in step.tool_calls.tool_calls} == pending:
            return step
    return None
