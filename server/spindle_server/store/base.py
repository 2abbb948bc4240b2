"""The Store protocol: everything the API and the engine persist, behind one interface.

Resources are kept as their protobuf messages (the API contract is the schema) next to the
columns that queries need. Every change of a run goes through `mutate_run`, which applies a
pure function to the current run inside one transaction and appends the events it returns
with gap-free indexes, so a status change and its event are committed together or not at all.

Every write an API method can make takes `record`, the request_id it serves (AIP-155): the store
commits that request's answer in the same transaction as the change, or refuses the change with
RequestReplayed when the request_id is already answered, so no crash or race applies it twice.
The check comes first in the transaction. SQLite's single writer orders twins by itself; a store
with concurrent writers (PostgreSQL, several replicas) claims the key first with INSERT ... ON
CONFLICT DO NOTHING, so a twin's insert waits for the first transaction and then finds the key
taken (its own transaction rolls back and it reads the answer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, runtime_checkable

from spindle.v1 import assistant_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server.drafts import MessageDraft

ACTIVE_STATUSES: frozenset[int] = frozenset(
    {run_pb2.PENDING, run_pb2.IN_PROGRESS, run_pb2.TOOL_CALLS, run_pb2.CANCELLING}
)
TERMINAL_STATUSES: frozenset[int] = frozenset(
    {run_pb2.COMPLETED, run_pb2.FAILED, run_pb2.CANCELLED, run_pb2.INCOMPLETE, run_pb2.EXPIRED}
)
# A lease owner is "<replica id>/<incarnation>" (the replica id has no "/").
LEASE_OWNER_SEPARATOR = "/"


@dataclass(frozen=True, slots=True)
class PageQuery:
    limit: int
    after_seq: int | None = None  # the cursor: continue after this row
    descending: bool = True


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_seq: int | None  # cursor of the next page; None on the last page


@dataclass(frozen=True, slots=True)
class RunFilter:
    thread_id: str = ""
    assistant_id: str = ""
    statuses: frozenset[int] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class RunChange:
    """What one transaction does to a run: its new state plus what comes with it."""

    run: run_pb2.Run
    events: list[run_pb2.StreamEvent] = field(
        default_factory=list
    )  # index/run_id/created_at set by the store
    messages: list[message_pb2.Message] = field(default_factory=list)  # appended to the run's thread
    steps: list[run_pb2.RunStep] = field(default_factory=list)  # inserted or replaced by id
    deadline: float | None = None  # new value of the expiry column (epoch seconds); None: keep
    release_lease: bool = False  # the engine lets go of the run (TOOL_CALLS, terminal)
    # Internal, never shown to clients: step id -> what the model said in the turn that made
    # that TOOL_CALLS step, kept for the prompts of later turns (see Store.tool_round_texts).
    step_texts: dict[str, str] = field(default_factory=dict)


# Receives a copy of the current run; returns the change, or raises to abort the transaction.
RunMutation = Callable[[run_pb2.Run], RunChange]


def embed_stored_run(change: RunChange) -> None:
    """The terminal event of a change carries the run exactly as this transaction stores it
    (updated_at included): DONE in ``done.run``, a terminal STATUS in ``status_change.run``. A
    waiter then has the finished run from the event and needs no Get after it. Call it last,
    once the store has stamped the run, before the run and its events are serialized."""
    for event in change.events:
        if event.type == run_pb2.StreamEvent.DONE:
            event.done.run.CopyFrom(change.run)
        elif event.type == run_pb2.StreamEvent.STATUS and event.status in TERMINAL_STATUSES:
            event.status_change.run.CopyFrom(change.run)


@dataclass(frozen=True, slots=True)
class ClaimedRun:
    run: run_pb2.Run
    epoch: int  # fencing token: writes with an older epoch are refused


@dataclass(frozen=True, slots=True)
class MutationResult:
    run: run_pb2.Run
    events: list[run_pb2.StreamEvent]
    claimed: ClaimedRun | None = None  # insert_run with a claim: the run as claimed, its epoch


@dataclass(frozen=True, slots=True)
class RunClaim:
    """Claim a run in the transaction that inserts it (Store.insert_run): the lease a claim by
    claim_runs would take (owner, a new epoch, expiry) and its PENDING -> IN_PROGRESS change."""

    owner: str
    lease_seconds: float
    mutate: RunMutation


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The answer a request_id was given, and which request it answered."""

    fingerprint: str
    response: bytes


@dataclass(slots=True)
class RequestKey:
    """A request_id whose answer a write records with its change (see the module docstring).

    The answer recorded is what the write returns to the API: the resource written (the run, for
    run writes), or the empty response for a delete. `recorded` is set once a write stored it.
    """

    project: str
    method: str
    request_id: str
    fingerprint: str
    recorded: bool = False

    @property
    def key(self) -> str:
        return f"{self.method}:{self.request_id}"


class RequestReplayed(Exception):
    """The request_id was answered already (maybe by a concurrent twin): the write did nothing."""

    def __init__(self, record: IdempotencyRecord) -> None:
        super().__init__("request_id already answered")
        self.record = record


@dataclass(frozen=True, slots=True)
class DueRuns:
    """Runs the engine's sweeper must look at."""

    expired: list[str]  # deadline passed while PENDING, TOOL_CALLS (or IN_PROGRESS/CANCELLING)
    orphaned: list[str]  # IN_PROGRESS/CANCELLING whose lease ran out (its owner died)


EventsListener = Callable[[Sequence[run_pb2.StreamEvent]], None]


@runtime_checkable
class WatchesRuns(Protocol):
    """A store shared by several processes (PostgreSQL) also delivers, to the events listeners,
    the events other processes commit. Reading them costs a query per commit, so it reads only
    the runs this process watches: `watched()` returns the ids of the runs with local listeners
    (e.g. the EventHub's feeds; membership is tested per hint, so make `in` cheap). None: all.
    A single-process store (SQLite) has no such method: every commit is its own."""

    def watch_runs(self, watched: Callable[[], Collection[str]] | None) -> None: ...

    def add_events_listener(self, listener: EventsListener, *, local_only: bool = False) -> None:
        """`local_only`: only events this process commits (per-process metrics)."""
        ...


class Store(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...

    def add_events_listener(self, listener: EventsListener) -> None:
        """Called in the event loop, after commit, with the events each transaction appended."""
        ...

    # Assistants
    async def insert_assistant(
        self, project: str, assistant: assistant_pb2.Assistant, *, record: RequestKey | None = None
    ) -> None: ...
    async def get_assistant(self, project: str, assistant_id: str) -> assistant_pb2.Assistant: ...
    async def update_assistant(
        self,
        project: str,
        assistant_id: str,
        mutate: Callable[[assistant_pb2.Assistant], None],
        *,
        record: RequestKey | None = None,
    ) -> assistant_pb2.Assistant: ...
    async def delete_assistant(
        self, project: str, assistant_id: str, *, record: RequestKey | None = None
    ) -> None: ...
    async def list_assistants(self, project: str, query: PageQuery) -> Page[assistant_pb2.Assistant]: ...

    # Threads and messages
    async def insert_thread(
        self,
        project: str,
        thread: thread_pb2.Thread,
        messages: Sequence[message_pb2.Message],
        *,
        record: RequestKey | None = None,
    ) -> None: ...
    async def get_thread(self, project: str, thread_id: str) -> thread_pb2.Thread: ...
    async def update_thread(
        self,
        project: str,
        thread_id: str,
        mutate: Callable[[thread_pb2.Thread], None],
        *,
        record: RequestKey | None = None,
    ) -> thread_pb2.Thread: ...
    async def delete_thread(self, project: str, thread_id: str, *, record: RequestKey | None = None) -> None:
        """Deletes messages, runs, steps and events too; StateError while a run is active."""
        ...

    async def list_threads(self, project: str, query: PageQuery) -> Page[thread_pb2.Thread]: ...
    async def insert_message(
        self, project: str, message: message_pb2.Message, *, record: RequestKey | None = None
    ) -> bytes:
        """StateError while the thread has an active run. Returns the message as stored (its
        serialized bytes): MessageService.Create answers them as they are."""
        ...

    def create_message(self, project: str, draft: MessageDraft) -> Awaitable[bytes]:
        """insert_message of the message `draft` builds (a new id, created now), built where it
        costs least: SQLite builds it on its writer thread, in the batch that writes it, off
        the event loop. MessageService.Create's hot path (no request_id). To await."""
        ...

    async def get_message(self, project: str, message_id: str) -> message_pb2.Message: ...
    async def list_messages(
        self, project: str, thread_id: str, query: PageQuery, run_id: str = ""
    ) -> Page[message_pb2.Message]: ...
    async def thread_messages(self, thread_id: str) -> list[message_pb2.Message]:
        """All messages of a thread, oldest first (to build a model prompt)."""
        ...

    # Runs
    async def insert_run(
        self,
        project: str,
        run: run_pb2.Run,
        messages: Sequence[message_pb2.Message],
        deadline: float,
        events: Sequence[run_pb2.StreamEvent],
        *,
        record: RequestKey | None = None,
        max_active_runs: int | None = None,
        claim: RunClaim | None = None,
    ) -> MutationResult:
        """Adds `messages` to the thread and the run; StateError when the thread has an active run,
        QuotaError when the project already has `max_active_runs` active runs (counted in the
        same transaction as the insert). With `claim`, the same transaction also claims the run
        as claim_runs would (lease, epoch, `claim.mutate`'s events after the insert's): the
        result's `run` is the run as inserted (Create's answer), `claimed` the run as claimed,
        `events` all of them."""
        ...

    async def get_run(self, project: str, run_id: str) -> run_pb2.Run: ...
    async def get_run_body(self, project: str, run_id: str) -> bytes:
        """The run as stored: a serialized Run (RunService.Get sends it as it is)."""
        ...

    def kept_run_body(self, project: str, run_id: str) -> bytes | None:
        """get_run_body's answer from the store's memory, if it keeps one that is current (at
        once, no coroutine: RunService.Get's hot path); None: ask get_run_body. Only a stored
        run can be kept, so a body found here is of a well-formed id."""
        ...

    async def get_run_any_project(self, run_id: str) -> tuple[str, run_pb2.Run]: ...
    async def get_last_run(self, project: str, thread_id: str) -> run_pb2.Run: ...
    async def list_runs(self, project: str, flt: RunFilter, query: PageQuery) -> Page[run_pb2.Run]: ...
    async def update_run_labels(
        self, project: str, run_id: str, labels: dict[str, str], *, record: RequestKey | None = None
    ) -> run_pb2.Run: ...
    async def mutate_run(
        self,
        run_id: str,
        mutate: RunMutation,
        *,
        epoch: int | None = None,
        project: str | None = None,
        record: RequestKey | None = None,
    ) -> MutationResult:
        """Apply `mutate` atomically; FencedError if `epoch` is given and is no longer the run's."""
        ...

    async def list_steps(self, project: str, run_id: str, query: PageQuery) -> Page[run_pb2.RunStep]: ...
    async def run_steps(self, run_id: str) -> list[run_pb2.RunStep]: ...
    async def read_events(self, run_id: str, start: int, limit: int) -> list[run_pb2.StreamEvent]: ...
    async def read_event_wires(self, run_id: str, start: int, limit: int) -> list[bytes]:
        """read_events' events as stored, serialized StreamEvents (Listen sends them as they are,
        without parsing and serializing each one again)."""
        ...

    async def tool_round_texts(self, run_id: str) -> dict[str, str]:
        """The run's RunChange.step_texts so far (step id -> text), without reading its log."""
        ...

    # Engine
    async def claim_runs(
        self, owner: str, lease_seconds: float, limit: int, mutate: RunMutation
    ) -> list[ClaimedRun]:
        """Take PENDING runs (oldest first) under a new lease epoch, applying `mutate` to each."""
        ...

    async def reclaim_run(
        self, run_id: str, owner: str, lease_seconds: float, mutate: RunMutation
    ) -> ClaimedRun | None:
        """Take over an IN_PROGRESS/CANCELLING run whose lease expired; None if it is not orphaned."""
        ...

    async def renew_lease(self, run_id: str, owner: str, epoch: int, lease_seconds: float) -> bool: ...
    async def due_runs(self, now: float, limit: int) -> DueRuns: ...
    async def release_all_leases(self, owner_prefix: str) -> int:
        """At start-up: end the leases a dead predecessor held, so that its runs are taken over
        at once. A store with one process (SQLite) ends them all; a shared one (PostgreSQL) those
        whose owner starts with `owner_prefix` (this replica's identity and the separator: its
        own earlier incarnations; other replicas' leases may be live)."""
        ...

    # Idempotency (AIP-155); the answers themselves are written by the writes above (`record`)
    async def get_request(self, project: str, key: str) -> IdempotencyRecord | None:
        """The answer recorded for `key` (RequestKey.key), if any."""
        ...

    async def save_request(self, request: RequestKey, response: bytes) -> IdempotencyRecord:
        """Record the answer of a request that wrote nothing; returns the record that is kept
        (an earlier one wins)."""
        ...

    async def purge_requests(self, older_than: float) -> int:
        """Forget request_ids older than `older_than` (epoch seconds); returns how many."""
        ...

    # Retention
    async def delete_expired_runs(self, before: float, limit: int) -> int:
        """Delete up to `limit` runs that reached a terminal status before `before` (epoch
        seconds), oldest first, with their events and steps, in one transaction; returns how
        many. Their messages stay on the thread."""
        ...

    async def checkpoint_wal(self) -> bool:
        """At a quiet moment: fold the write-ahead log into the database and shrink it. False if
        it was busy (try again later)."""
        ...
