"""Several real server processes on one PostgreSQL database.

Any replica serves any call for any run; a replica killed (SIGKILL) or stalled (SIGSTOP) while it
executes a run hands the run on under the lease, and the stalled one's late writes are refused by
the lease epoch; a restart of PostgreSQL itself loses no event a client was given. Every test ends
with the invariant checker over what its clients saw.

The moment of a crash or stall is steered with a fault-point hold (a folder per replica: the
replica that reaches the hold is the one executing the run), and no replica takes a run over
before the test let it (a busy machine can delay a live owner's renewal past the short lease).
Takeover times are printed (run with -s); the only bound asserted is a loose failure bound.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spindle.v1 import common_pb2, run_pb2
from support import postgres
from support.faults import Holds
from support.followers import Follower
from support.invariants import History, Seen, assert_invariants
from support.replicas import replicas, shared
from support.server import PostgresDatabase, ServerProcess, TestDatabase
from support.stubs import TERMINAL, Stubs

pytestmark = [
    pytest.mark.postgresql_only("replicas share one PostgreSQL database"),
    pytest.mark.timeout(300),  # three servers (and a cluster) on a loaded machine: a failure bound
]

EventType = run_pb2.StreamEvent
LEASE = 2.0  # short, so that a dead replica's run is taken over soon
BOUND = 60.0  # failure bound for waits; never a timing assertion
TAKEOVER_BOUND = LEASE + 30.0  # failure bound; the figure measured is printed
DELTA = "store.after_mutate:IN_PROGRESS"  # after each committed delta of an executing run
RENEWAL = "engine.before_lease_renewal"
IN_WRITE = "store.in_mutate:IN_PROGRESS"  # inside a delta's transaction, the run's row locked
# Before a replica takes an orphaned run over. A busy machine can delay a live owner's renewal
# past a short lease; held, no other replica takes the run before the test kills or stops it.
RECLAIM = "engine.before_reclaim"
WORDS = " ".join(f"w{i}" for i in range(40))
NewDatabase = Callable[..., TestDatabase]


class ReplicaHolds:
    """A fault-point folder per replica: a hold tells which replica got there."""

    def __init__(self, root: Path, count: int) -> None:
        self.holds = [Holds(root / f"replica{index}") for index in range(count)]

    def env(self, *points: str) -> Callable[[int], dict[str, str]]:
        return lambda index: self.holds[index].env(*points)

    def let_pass(self, point: str, upto: int, replicas: Sequence[int] | None = None) -> None:
        for index in range(len(self.holds)) if replicas is None else replicas:
            self.holds[index].release_all(point, upto)

    def wait_any(self, point: str, nth: int, among: Sequence[int] | None = None) -> int:
        """The replica (of `among`, default all) held at the `nth` arrival at `point`."""
        deadline = time.monotonic() + BOUND
        while True:
            for index in range(len(self.holds)) if among is None else among:
                if self.holds[index].is_reached(point, nth):
                    return index
            if time.monotonic() > deadline:
                raise AssertionError(f"no replica reached {point} (#{nth})")
            time.sleep(0.005)


class AutoRelease:
    """Releases every arrival at `point` on each replica as it comes, except on replicas frozen
    (theirs wait): e.g. lease renewals pass until a test wants one replica's held."""

    def __init__(self, holds: ReplicaHolds, point: str, frozen: Sequence[int] = ()) -> None:
        self.frozen: set[int] = set(frozen)
        self._holds, self._point = holds, point
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        released = [0] * len(self._holds.holds)
        while not self._stop.wait(0.005):
            for index, holds in enumerate(self._holds.holds):
                while index not in self.frozen and holds.is_reached(self._point, released[index] + 1):
                    released[index] += 1
                    holds.release(self._point, released[index])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Lease:
    """The run's lease as the database has it (owner "<replica id>/<incarnation>", epoch)."""

    def __init__(self, database: TestDatabase) -> None:
        assert isinstance(database, PostgresDatabase)
        self._admin = postgres.Admin(database.dsn)

    def read(self, run_id: str) -> tuple[str, int]:
        row = self._admin.fetchval("SELECT lease_owner || '|' || lease_epoch FROM runs WHERE id = $1", run_id)
        owner, _, epoch = str(row).rpartition("|")
        return owner, int(epoch)

    def wait_epoch_above(self, run_id: str, epoch: int) -> tuple[str, int]:
        deadline = time.monotonic() + TAKEOVER_BOUND
        while True:
            owner, current = self.read(run_id)
            if current > epoch:
                return owner, current
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} was not taken over (epoch still {current})")
            time.sleep(0.02)

    def close(self) -> None:
        self._admin.close()


@pytest.fixture
def lease_of() -> Iterator[Callable[[TestDatabase], Lease]]:
    opened: list[Lease] = []

    def open_lease(database: TestDatabase) -> Lease:
        opened.append(Lease(database))
        return opened[-1]

    yield open_lease
    for lease in opened:
        lease.close()


def replica_of(servers: Sequence[ServerProcess], owner: str) -> int:
    replica = owner.partition("/")[0]
    (index,) = [i for i, server in enumerate(servers) if server.replica_id == replica]
    return index


class Followers:
    """One Follower per replica from index 0, each on a thread: on its own replica first, and
    after an error (a dead replica, PostgreSQL away) on the next, from its last index + 1."""

    def __init__(self, history: History, run_id: str, servers: Sequence[ServerProcess]) -> None:
        self.followers = [Follower(history, run_id) for _ in servers]
        self.endings: list[list[grpc.StatusCode]] = [[] for _ in servers]
        addresses = [server.address for server in servers]
        self._threads = [
            threading.Thread(target=self._follow, args=(i, addresses[i:] + addresses[:i]), daemon=True)
            for i in range(len(servers))
        ]
        for thread in self._threads:
            thread.start()

    def _follow(self, index: int, addresses: list[str]) -> None:
        follower, endings = self.followers[index], self.endings[index]
        deadline = time.monotonic() + 3 * BOUND
        attempt = 0
        while time.monotonic() < deadline:
            stubs = Stubs.connect(addresses[attempt % len(addresses)])
            try:
                code = follower.follow(stubs)
            finally:
                stubs.close()
            endings.append(code)
            if code == grpc.StatusCode.OK:
                return
            attempt += 1
            time.sleep(0.05)  # PostgreSQL may be away for a moment: do not spin

    def saw_deltas(self, count: int) -> bool:
        return all(
            sum(e.type == EventType.PARTIAL_MESSAGE for e in f.seen.events) >= count for f in self.followers
        )

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=3 * BOUND)
            assert not thread.is_alive(), "a listener never saw its run end"

    def assert_clean_endings(self) -> None:
        """Each ended with the run's end, after at most clean UNAVAILABLE errors (resumed)."""
        for endings in self.endings:
            assert endings[-1] == grpc.StatusCode.OK, endings
            assert set(endings) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, endings


def wait_until(condition: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_any_replica_serves_any_call_for_any_run(new_database: NewDatabase) -> None:
    """Created on A (its retry on B), listened to on B from the start and from the middle,
    tool results on C (their retry on A), waited for on A; a second run cancelled from B while
    another replica executes it (the cancel's retry on C)."""
    with replicas(shared(new_database()), 3, ["--tool-timeout", "600"]) as servers:
        a, b, c = (Stubs.connect(server.address) for server in servers)
        history = History()
        try:
            tools = a.tool_assistant("get_weather")
            thread = a.thread('/tool get_weather {"city": "Oslo"}\n/sleep 2')
            create = run_pb2.CreateRunRequest(
                assistant_id=tools.id, thread_id=thread.id, request_id=str(uuid.uuid4())
            )
            run = a.runs.Create(create, timeout=10)
            history.answered(create.request_id, run)
            again = b.runs.Create(create, timeout=10)
            history.answered(create.request_id, again)
            assert again.id == run.id

            from_start = history.listener(run.id)
            listening = threading.Thread(target=_listen, args=(b, from_start), daemon=True)
            listening.start()

            paused = c.wait(run.id, timeout=BOUND)
            assert paused.status == run_pb2.TOOL_CALLS
            (call,) = paused.required_tool_calls
            submit = run_pb2.SubmitToolResultsRequest(
                run_id=run.id,
                tool_results=[common_pb2.ToolResult(tool_call_id=call.id, output=WORDS)],
                request_id=str(uuid.uuid4()),
            )
            history.answered(submit.request_id, c.runs.SubmitToolResults(submit, timeout=10))
            history.answered(submit.request_id, a.runs.SubmitToolResults(submit, timeout=10))

            # Join on B in the middle of the reply: from an index B's first listener has passed.
            def resumed_reply() -> list[run_pb2.StreamEvent]:
                events = from_start.events
                pause = next((i for i, e in enumerate(events) if e.type == EventType.TOOL_CALLS), None)
                after = [] if pause is None else events[pause:]
                return [e for e in after if e.type == EventType.PARTIAL_MESSAGE]

            wait_until(lambda: len(resumed_reply()) >= 3, "the resumed reply to stream")
            middle = history.listener(run.id, resumed_reply()[1].index)
            _listen(b, middle)

            done = a.wait(run.id, timeout=BOUND)
            assert done.status == run_pb2.COMPLETED
            assert WORDS in done.reply.content[0].text.text
            listening.join(timeout=BOUND)
            assert not listening.is_alive()
            assert from_start.events and middle.events
            assert is_run_end(from_start.events[-1]) and is_run_end(middle.events[-1])

            second = _cancelled_from_another_replica(servers, history)
            assert_invariants(b, [run.id, second], history, bound=BOUND)
        finally:
            for stubs in (a, b, c):
                stubs.close()


def _cancelled_from_another_replica(servers: Sequence[ServerProcess], history: History) -> str:
    a, b, c = (Stubs.connect(server.address) for server in servers)
    try:
        run = c.start("/sleep 60 " + WORDS)
        seen = history.listener(run.id)
        listening = threading.Thread(target=_listen, args=(a, seen), daemon=True)
        listening.start()
        wait_until(lambda: any(e.type == EventType.PARTIAL_MESSAGE for e in seen.events), "a delta")
        # A late listener on B from the start: B skipped the hints of the run's commits so far
        # (nobody there followed it) and reads them from the table itself.
        late = history.listener(run.id)
        late_listening = threading.Thread(target=_listen, args=(b, late), daemon=True)
        late_listening.start()
        wait_until(lambda: any(e.type == EventType.PARTIAL_MESSAGE for e in late.events), "a delta on B")
        cancel = run_pb2.CancelRunRequest(run_id=run.id, request_id=str(uuid.uuid4()))
        history.answered(cancel.request_id, b.runs.Cancel(cancel, timeout=10))
        history.answered(cancel.request_id, c.runs.Cancel(cancel, timeout=10))
        assert a.wait(run.id, timeout=BOUND).status == run_pb2.CANCELLED
        for thread, events in ((listening, seen.events), (late_listening, late.events)):
            thread.join(timeout=BOUND)
            assert not thread.is_alive() and is_run_end(events[-1])
        return run.id
    finally:
        for stubs in (a, b, c):
            stubs.close()


def _listen(stubs: Stubs, seen: Seen) -> None:
    request = run_pb2.ListenRunRequest(run_id=seen.run_id, events_start_idx=seen.start)
    for event in stubs.runs.Listen(request, timeout=2 * BOUND):
        seen.events.append(event)


def is_run_end(event: run_pb2.StreamEvent) -> bool:
    if event.type in (EventType.DONE, EventType.ERROR):
        return True
    return event.type == EventType.STATUS and event.status in TERMINAL


def test_a_killed_replicas_run_is_finished_by_another(
    new_database: NewDatabase, lease_of: Callable[[TestDatabase], Lease], tmp_path: Path
) -> None:
    """SIGKILL the replica executing a run, mid-stream: another takes the run over once the
    lease ran out and finishes it; listeners on every replica (those on the dead one resume
    elsewhere) see the whole run without a gap or a duplicate."""
    holds = ReplicaHolds(tmp_path / "holds", 3)
    holds.let_pass(DELTA, 2)
    database = new_database()
    lease = lease_of(database)
    env = holds.env(DELTA, RECLAIM)
    with replicas(shared(database), 3, ["--lease-seconds", str(LEASE)], env=env) as servers:
        takeovers = AutoRelease(holds, RECLAIM, frozen=range(3))
        stubs = [Stubs.connect(server.address) for server in servers]
        history = History()
        try:
            run = stubs[0].start("/sleep 2 " + WORDS)
            followers = Followers(history, run.id, servers)
            executing = holds.wait_any(DELTA, 3)  # committed its third delta, held there
            owner, epoch = lease.read(run.id)
            assert replica_of(servers, owner) == executing
            survivors = [i for i in range(3) if i != executing]
            holds.let_pass(DELTA, 10_000, survivors)
            wait_until(lambda: followers.saw_deltas(3), "every listener to be mid-run")

            killed = time.monotonic()
            servers[executing].kill()
            takeovers.frozen.difference_update(survivors)
            new_owner, _ = lease.wait_epoch_above(run.id, epoch)
            taken_over = time.monotonic() - killed
            takeovers.frozen.update(survivors)  # once: however late the new owner's renewals
            done = stubs[survivors[0]].wait(run.id, timeout=TAKEOVER_BOUND + BOUND)
            finished = time.monotonic() - killed
            print(
                f"\nSIGKILL takeover (lease {LEASE:g} s): run taken over after {taken_over:.2f} s,"
                f" finished after {finished:.2f} s (its remaining reply streams about 2 s)"
            )
            assert replica_of(servers, new_owner) in survivors
            assert done.status == run_pb2.COMPLETED and done.attempt == 2
            assert taken_over < TAKEOVER_BOUND
            followers.join()
            followers.assert_clean_endings()
            assert_invariants(stubs[survivors[0]], [run.id], history, bound=BOUND)
        finally:
            takeovers.stop()
            for each in stubs:
                each.close()


def test_a_stalled_replica_writes_nothing_after_its_run_was_taken_over(
    new_database: NewDatabase, lease_of: Callable[[TestDatabase], Lease], tmp_path: Path
) -> None:
    """SIGSTOP the replica executing a run past its lease; another takes the run over and, while
    it is mid-stream, SIGCONT: the stalled executor's next delta is refused by the lease epoch
    (its lease renewal is held, so the executor writes before it could learn it lost the run).
    Nothing of it lands: one terminal event, the reply is exactly the deltas after the takeover's
    discard, and every replica and listener has the same log."""
    holds = ReplicaHolds(tmp_path / "holds", 3)
    holds.let_pass(DELTA, 2)
    database = new_database()
    lease = lease_of(database)
    env = holds.env(DELTA, RENEWAL, RECLAIM)
    with replicas(shared(database), 3, ["--lease-seconds", str(LEASE)], env=env) as servers:
        renewals = AutoRelease(holds, RENEWAL)
        takeovers = AutoRelease(holds, RECLAIM, frozen=range(3))
        stubs = [Stubs.connect(server.address) for server in servers]
        history = History()
        try:
            run = stubs[0].start("/sleep 2 " + WORDS)
            followers = Followers(history, run.id, servers)
            stalled = holds.wait_any(DELTA, 3)
            owner, epoch = lease.read(run.id)
            assert replica_of(servers, owner) == stalled
            survivors = [i for i in range(3) if i != stalled]
            holds.let_pass(DELTA, 2, survivors)  # the one taking over is held at its third delta
            process = servers[stalled].process
            assert process is not None

            renewals.frozen.add(stalled)
            stopped = time.monotonic()
            os.kill(process.pid, signal.SIGSTOP)
            try:
                holds.holds[stalled].release(DELTA, 3)  # it goes on streaming once it runs again
                takeovers.frozen.difference_update(survivors)
                new_owner, _ = lease.wait_epoch_above(run.id, epoch)
                taken_over = time.monotonic() - stopped
                takeovers.frozen.update(survivors)
                taking_over = replica_of(servers, new_owner)
                assert taking_over in survivors
                assert (
                    holds.wait_any(DELTA, 3, survivors) == taking_over
                )  # mid-stream, IN_PROGRESS, its epoch
            finally:
                os.kill(process.pid, signal.SIGCONT)
            print(f"\nSIGSTOP takeover (lease {LEASE:g} s): run taken over after {taken_over:.2f} s")
            refused = servers[stalled].wait_for_log(
                lambda e: e.get("run_id") == run.id and e.get("event") == "run_execution_superseded",
                timeout=BOUND,
            )
            assert "superseded" in str(refused.get("reason")), refused
            holds.let_pass(DELTA, 10_000)
            renewals.frozen.clear()

            done = stubs[survivors[0]].wait(run.id, timeout=BOUND)
            assert done.status == run_pb2.COMPLETED and done.attempt == 2
            ended = stubs[survivors[0]].events(run.id)
            discards = [i for i, e in enumerate(ended) if e.status_change.discard_partial_message]
            assert len(discards) == 1
            after = "".join(
                e.message_delta.text for e in ended[discards[0] :] if e.type == EventType.PARTIAL_MESSAGE
            )
            assert after == done.reply.content[0].text.text  # no delta of the stalled executor
            for each in stubs:  # the stalled replica too, through its own store and fan-out
                assert each.events(run.id) == ended
            followers.join()
            followers.assert_clean_endings()
            for follower in followers.followers:
                assert follower.seen.events == ended
            assert_invariants(stubs[survivors[0]], [run.id], history, bound=BOUND)
        finally:
            renewals.stop()
            takeovers.stop()
            for each in stubs:
                each.close()


def test_a_replica_stalled_inside_a_transaction_does_not_block_the_takeover(
    new_database: NewDatabase, lease_of: Callable[[TestDatabase], Lease], tmp_path: Path
) -> None:
    """SIGSTOP the executing replica while its write holds the run's row (transaction open):
    PostgreSQL ends the stalled session (idle_in_transaction_session_timeout), so a survivor
    takes the run over and finishes it; the stalled write never commits."""
    holds = ReplicaHolds(tmp_path / "holds", 3)
    holds.let_pass(IN_WRITE, 2)
    database = new_database()
    lease = lease_of(database)
    env = holds.env(IN_WRITE, RECLAIM)
    with replicas(shared(database), 3, ["--lease-seconds", str(LEASE)], env=env) as servers:
        takeovers = AutoRelease(holds, RECLAIM, frozen=range(3))
        stubs = [Stubs.connect(server.address) for server in servers]
        history = History()
        try:
            run = stubs[0].start("/sleep 2 " + WORDS)
            followers = Followers(history, run.id, servers)
            stalled = holds.wait_any(IN_WRITE, 3)  # inside its third delta's transaction
            owner, epoch = lease.read(run.id)
            assert replica_of(servers, owner) == stalled
            survivors = [i for i in range(3) if i != stalled]
            holds.let_pass(IN_WRITE, 10_000, survivors)
            process = servers[stalled].process
            assert process is not None
            stopped = time.monotonic()
            os.kill(process.pid, signal.SIGSTOP)
            try:
                holds.holds[stalled].release(IN_WRITE, 3)
                takeovers.frozen.difference_update(survivors)
                new_owner, _ = lease.wait_epoch_above(run.id, epoch)
                taken_over = time.monotonic() - stopped
                takeovers.frozen.update(survivors)
                assert replica_of(servers, new_owner) in survivors
                done = stubs[survivors[0]].wait(run.id, timeout=BOUND)
            finally:
                os.kill(process.pid, signal.SIGCONT)
            print(f"\nSIGSTOP inside a transaction (lease {LEASE:g} s): taken over after {taken_over:.2f} s")
            assert done.status == run_pb2.COMPLETED and done.attempt == 2
            ended = stubs[survivors[0]].events(run.id)
            discards = [i for i, e in enumerate(ended) if e.status_change.discard_partial_message]
            after = "".join(
                e.message_delta.text for e in ended[discards[0] :] if e.type == EventType.PARTIAL_MESSAGE
            )
            assert len(discards) == 1 and after == done.reply.content[0].text.text
            servers[stalled].wait_for_log(
                lambda e: (
                    e.get("run_id") == run.id
                    and e.get("event") in ("run_execution_store_unavailable", "run_execution_superseded")
                ),
                timeout=BOUND,
            )
            for each in stubs:
                assert each.events(run.id) == ended
            followers.join()
            followers.assert_clean_endings()
            assert_invariants(stubs[survivors[0]], [run.id], history, bound=BOUND)
        finally:
            takeovers.stop()
            for each in stubs:
                each.close()


def is_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def private_cluster() -> Iterator[postgres.Cluster]:
    """A PostgreSQL cluster of the test's own: restarting the session's would cut other tests."""
    cluster = postgres.Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.skipif(not postgres.bindir(), reason="needs PostgreSQL's binaries for a cluster of its own")
def test_postgresql_restart_under_load_loses_no_acknowledged_event(
    private_cluster: postgres.Cluster,
) -> None:
    """Runs streaming on three replicas, listened to on others; PostgreSQL stops (fast: every
    connection cut) and starts again on the same port. The replicas reconnect (pool and LISTEN),
    every event a client was given is in the final log, listeners see no gap and no duplicate
    (a Listen cut with UNAVAILABLE resumes from its index), and health is SERVING again."""
    admin = postgres.Admin(private_cluster.dsn)
    try:
        database = PostgresDatabase(admin.create_database())
    finally:
        admin.close()
    with replicas(shared(database), 3, ["--lease-seconds", str(LEASE)]) as servers:
        stubs = [Stubs.connect(server.address) for server in servers]
        history = History()
        run_ids: list[str] = []
        watching: list[Followers] = []
        try:
            echo = stubs[0].assistant(name="echo")
            for index in range(3):
                run = stubs[index].start("/sleep 4 " + WORDS, assistant=echo)
                run_ids.append(run.id)
                watching.append(Followers(history, run.id, servers))
            wait_until(lambda: all(f.saw_deltas(2) for f in watching), "every run to stream")

            private_cluster.stop("fast", keep=True)
            refused = 0
            for each in stubs:  # while it is down: a clean UNAVAILABLE, nothing acknowledged
                try:
                    run_ids.append(each.start("while down", assistant=echo).id)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                    refused += 1
            private_cluster.start()  # the same port

            for server in servers:
                server.wait_for_log(lambda e: e.get("event") == "pg_listen_reconnected", timeout=BOUND)
                wait_until(partial(is_serving, server.address), "health SERVING")
            for each in stubs:  # after it: created on one replica, listened to on the others
                run = _retry_unavailable(partial(each.start, WORDS, assistant=echo))
                run_ids.append(run.id)
                watching.append(Followers(history, run.id, servers))
            for followers in watching:
                followers.join()
                followers.assert_clean_endings()
            print(f"\nPostgreSQL restart: {refused} of 3 calls while it was down got UNAVAILABLE")
            assert_invariants(stubs[0], run_ids, history, bound=2 * BOUND)
        finally:
            for each in stubs:
                each.close()


def _retry_unavailable(call: Callable[[], run_pb2.Run]) -> run_pb2.Run:
    """The first call on a pooled connection PostgreSQL cut may meet UNAVAILABLE once."""
    deadline = time.monotonic() + BOUND
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
