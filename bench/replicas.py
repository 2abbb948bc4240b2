"""Replicas on one PostgreSQL: throughput with 1, 2 and 3 replicas against one SQLite server,
Listen delivery latency across replicas, and failover time after SIGKILL.

Everything runs on a private PostgreSQL cluster this benchmark starts (tests/support/postgres.py's
cluster, on disk with fsync on, like the SQLite server's file), with a fresh database for each
configuration. Load comes from separate client processes (`bench._replicas_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench import _mode
from bench._postgres import Cluster, available
from bench._server import ROOT, BenchServer, ServedProcess, spindle_command
from bench.load import cpu_seconds, percentile
from spindle.v1 import (
    assistant_pb2,
    assistant_pb2_grpc,
    message_pb2,
    run_pb2,
    run_pb2_grpc,
    thread_pb2,
    thread_pb2_grpc,
)

CALL_TIMEOUT = 120.0  # failure bounds only
CLIENT_PROCESSES = 6  # pinned to replicas in turn: 6 divides evenly over 1, 2 and 3
CONCURRENCY = 8  # runs in flight per client process
SHORT_LEASE = 2.0
DEFAULT_LEASE = 30.0  # the server's default (engine/config.py)
LATENCY_WORDS, LATENCY_CONCURRENT = 60, 8
FAILOVER_WORDS = 20
TERMINAL = frozenset(
    {run_pb2.COMPLETED, run_pb2.FAILED, run_pb2.CANCELLED, run_pb2.INCOMPLETE, run_pb2.EXPIRED}
)


# ---- processes -----------------------------------------------------------------------------


def replica(dsn: str, *args: str) -> ServedProcess:
    return ServedProcess(spindle_command(dsn, "--openai-port", "off", *args))


def start_all(stack: contextlib.ExitStack, servers: Sequence[ServedProcess]) -> None:
    """Start servers side by side (each takes a second or two on a busy machine); `stack` stops
    them all, side by side too."""
    stack.callback(_stop_all, servers)
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        for future in [pool.submit(server.__enter__) for server in servers]:
            future.result()


def _stop_all(servers: Sequence[ServedProcess]) -> None:
    for server in servers:  # SIGTERM to all first: each then stops while the next is waited for
        with contextlib.suppress(AssertionError, OSError):
            os.kill(server.pid, signal.SIGTERM)
    for server in servers:
        server.__exit__(None, None, None)


class Clients:
    """The load processes; each answers one window at a time."""

    def __init__(self, count: int) -> None:
        self._processes = [
            subprocess.Popen(
                [sys.executable, "-m", "bench._replicas_client"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for _ in range(count)
        ]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def window(self, addresses: Sequence[str], assistant: str, seconds: float) -> list[dict[str, float]]:
        """All clients at once, client i on addresses[i % len]; each one's answer."""
        for index, process in enumerate(self._processes):
            assert process.stdin is not None
            command = {
                "address": addresses[index % len(addresses)],
                "assistant": assistant,
                "seconds": seconds,
                "concurrency": CONCURRENCY,
            }
            process.stdin.write(json.dumps(command) + "\n")
            process.stdin.flush()
        answers = []
        for process in self._processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("a load process ended early")
            answers.append(json.loads(line))
        return answers

    def close(self) -> None:
        for process in self._processes:
            assert process.stdin is not None
            with contextlib.suppress(OSError):
                process.stdin.close()
        for process in self._processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


async def create_assistant(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = assistant_pb2_grpc.AssistantServiceStub(channel)
        return str(
            (await stub.Create(assistant_pb2.CreateAssistantRequest(name="bench"), timeout=CALL_TIMEOUT)).id
        )


# ---- 1. throughput ---------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    servers: list[ServedProcess]
    dsn: str = ""
    assistant: str = ""
    # per window: runs/s, events/s, and CPU seconds of replicas, PostgreSQL, clients, the rest
    runs: list[float] = field(default_factory=list)
    events: list[float] = field(default_factory=list)
    errors: int = 0
    # part -> per window (CPU seconds, runs/s, window seconds)
    cpu: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)

    @property
    def addresses(self) -> list[str]:
        return [server.address for server in self.servers]

    def cores_busy(self) -> float:
        """Median over windows of every process's CPU seconds per second of the window."""
        windows = zip(*self.cpu.values(), strict=True)
        return _median([sum(cpu / seconds for cpu, _, seconds in window) for window in windows])

    def median_cpu_ms_per_run(self, part: str) -> float:
        return _median([1000 * cpu / (rate * seconds) for cpu, rate, seconds in self.cpu.get(part, [])])


@dataclass
class Throughput:
    configs: list[Config]
    windows: int
    window_seconds: float
    client_pids: list[int]


def measure_throughput(cluster: Cluster, stack: contextlib.ExitStack) -> Throughput:
    windows, window, warmup = _mode.sized(5, 1), _mode.seconds(2.5, 0.25), _mode.seconds(1.0, 0.15)
    dsns = [cluster.database() for _ in range(3 if not _mode.SMOKE else 2)]
    sqlite = BenchServer("--openai-port", "off")
    configs = [Config("SQLite, 1 server", [sqlite])]
    configs += [
        Config(
            f"PostgreSQL, {n} replica{'s' if n > 1 else ''}",
            [replica(dsns[n - 1]) for _ in range(n)],
            dsns[n - 1],
        )
        for n in ((1, 2, 3) if not _mode.SMOKE else (1, 2))  # smoke: fewer servers to start
    ]
    start_all(stack, [server for config in configs for server in config.servers])
    print("  servers up", flush=True)
    for config in configs:
        config.assistant = asyncio.run(create_assistant(config.addresses[0]))
    clients = Clients(_mode.sized(CLIENT_PROCESSES, 2))
    stack.callback(clients.close)
    everything = [server.pid for config in configs for server in config.servers]
    for number in range(windows + 1):  # the first round warms every configuration up
        for config in configs:
            pids = {"servers": [s.pid for s in config.servers], "clients": clients.pids}
            pids["idle servers"] = [pid for pid in everything if pid not in pids["servers"]]
            before = {part: sum(cpu_seconds(pid) for pid in group) for part, group in pids.items()}
            postgres_before = cluster.cpu_seconds()
            answers = clients.window(config.addresses, config.assistant, window if number else warmup)
            postgres_used = cluster.cpu_seconds() - postgres_before
            used = {
                part: sum(cpu_seconds(pid) for pid in group) - before[part] for part, group in pids.items()
            }
            if number == 0:
                continue
            seconds = statistics.mean(answer["seconds"] for answer in answers)
            runs = sum(answer["runs"] / answer["seconds"] for answer in answers)
            config.runs.append(runs)
            config.events.append(sum(answer["events"] / answer["seconds"] for answer in answers))
            config.errors += int(sum(answer["errors"] for answer in answers))
            if config.name.startswith("SQLite"):
                used.pop("postgres", None)
            else:
                used["postgres"] = postgres_used
            for part, cpu in used.items():
                config.cpu.setdefault(part, []).append((cpu, runs, seconds))
            print(f"  {config.name}: {runs:,.0f} runs/s", flush=True)
        if number == 0:
            print("  (warm-up round done)", flush=True)
    return Throughput(configs, windows, window, clients.pids)


# ---- 2. Listen latency across replicas ---------------------------------------------------------


@dataclass
class Latency:
    same_ms: list[float] = field(default_factory=list)  # created_at -> a listener on the executing replica
    cross_ms: list[float] = field(default_factory=list)  # created_at -> a listener on the other one
    behind_ms: list[float] = field(
        default_factory=list
    )  # the other replica's listener after the executing one's
    runs: int = 0
    other_executor: int = 0  # runs the other replica claimed first (labels swapped)


async def _owner_pid(pool: object, run_id: str) -> int | None:
    owner = await pool.fetchval("SELECT lease_owner FROM runs WHERE id = $1", run_id)  # type: ignore[attr-defined]
    parts = str(owner or "").split(":")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


async def _listen(
    runs: run_pb2_grpc.RunServiceStub, run_id: str, into: dict[int, tuple[float, float]]
) -> None:
    """index -> (created_at, received), wall clock (the server's clock is this machine's)."""
    async for event in runs.Listen(run_pb2.ListenRunRequest(run_id=run_id), timeout=CALL_TIMEOUT):
        into[event.index] = (event.created_at.ToNanoseconds() / 1e9, time.time())


async def measure_latency(dsn: str, a: ServedProcess, b: ServedProcess) -> Latency:
    import asyncpg

    words, spread, concurrent = LATENCY_WORDS, _mode.seconds(2.0, 0.5), LATENCY_CONCURRENT
    rounds = max(1, _mode.sized(3000, 100) // (words * concurrent))
    text = f"/sleep {spread:g} " + " ".join(f"w{i}" for i in range(words))
    figures = Latency()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    channel_a, channel_b = grpc.aio.insecure_channel(a.address), grpc.aio.insecure_channel(b.address)
    try:
        assistant = (
            await assistant_pb2_grpc.AssistantServiceStub(channel_a).Create(
                assistant_pb2.CreateAssistantRequest(name="bench"), timeout=CALL_TIMEOUT
            )
        ).id
        threads = thread_pb2_grpc.ThreadServiceStub(channel_a)
        runs_a, runs_b = run_pb2_grpc.RunServiceStub(channel_a), run_pb2_grpc.RunServiceStub(channel_b)

        async def one() -> None:
            thread = await threads.Create(
                thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text=text)]),
                timeout=CALL_TIMEOUT,
            )
            run = await runs_a.Create(
                run_pb2.CreateRunRequest(assistant_id=assistant, thread_id=thread.id), timeout=CALL_TIMEOUT
            )
            seen_a: dict[int, tuple[float, float]] = {}
            seen_b: dict[int, tuple[float, float]] = {}
            listeners = asyncio.gather(_listen(runs_a, run.id, seen_a), _listen(runs_b, run.id, seen_b))
            owner = None
            while owner is None and not listeners.done():
                owner = await _owner_pid(pool, run.id)
                await asyncio.sleep(0.02)
            await listeners
            same, other = (seen_a, seen_b) if owner != b.pid else (seen_b, seen_a)
            figures.runs += 1
            figures.other_executor += owner == b.pid
            # Only events committed once both streams were live (earlier ones come as replay).
            live_from = max(min(received for _, received in seen.values()) for seen in (same, other))
            for index, (created, received) in same.items():
                if created > live_from and index in other:
                    figures.same_ms.append(1000 * (received - created))
                    figures.cross_ms.append(1000 * (other[index][1] - created))
                    figures.behind_ms.append(1000 * (other[index][1] - received))

        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(concurrent)))
    finally:
        await channel_a.close()
        await channel_b.close()
        await pool.close()
    return figures


# ---- 3. failover after SIGKILL ---------------------------------------------------------------


@dataclass
class Failover:
    lease: float
    kills: int = 0
    resumed_s: list[float] = field(default_factory=list)  # kill -> first event of the new owner
    ended_s: list[float] = field(default_factory=list)  # kill -> terminal event
    not_on_victim: int = 0  # runs the survivor executed from the start (not samples)


async def measure_failover(dsn: str, lease: float, kills: int, runs_per_kill: int) -> Failover:
    """Replica A executes `runs_per_kill` runs mid-stream and is SIGKILLed; replica B (where the
    listeners are) takes them over. A is started again for the next kill."""
    import asyncpg

    figures = Failover(lease, kills)
    flags = ("--lease-seconds", f"{lease:g}")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        with contextlib.ExitStack() as stack:
            survivor = replica(dsn, *flags)
            start_all(stack, [survivor])
            async with grpc.aio.insecure_channel(survivor.address) as channel_b:
                runs_b = run_pb2_grpc.RunServiceStub(channel_b)
                for _ in range(kills):
                    with replica(dsn, *flags) as victim:
                        await _kill_mid_stream(victim, runs_b, pool, runs_per_kill, figures)
    finally:
        await pool.close()
    return figures


async def _kill_mid_stream(
    victim: ServedProcess, runs_b: run_pb2_grpc.RunServiceStub, pool: Any, count: int, figures: Failover
) -> None:
    text = f"/sleep {_mode.seconds(2.0, 0.5):g} " + " ".join(f"w{i}" for i in range(FAILOVER_WORDS))
    victim_pid = victim.pid
    async with grpc.aio.insecure_channel(victim.address) as channel_a:
        assistant = await _assistant(channel_a)
        threads = thread_pb2_grpc.ThreadServiceStub(channel_a)
        runs_a = run_pb2_grpc.RunServiceStub(channel_a)
        run_ids = []
        for _ in range(count):
            thread = await threads.Create(
                thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text=text)]),
                timeout=CALL_TIMEOUT,
            )
            run = await runs_a.Create(
                run_pb2.CreateRunRequest(assistant_id=assistant, thread_id=thread.id), timeout=CALL_TIMEOUT
            )
            run_ids.append(run.id)
        followers = {run_id: _Follower(runs_b, run_id, CALL_TIMEOUT + figures.lease) for run_id in run_ids}
        tasks = [asyncio.create_task(follower.follow()) for follower in followers.values()]
        waits = (follower.streaming.wait() for follower in followers.values())
        await asyncio.wait_for(asyncio.gather(*waits), CALL_TIMEOUT)
        owners = {run_id: await _owner_pid(pool, run_id) for run_id in run_ids}
        killed_at = time.time()
        os.kill(victim_pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), CALL_TIMEOUT + figures.lease)
    for run_id, follower in followers.items():
        if owners[run_id] != victim_pid:
            figures.not_on_victim += 1
            continue
        after = [event for event in follower.seen if _created(event) > killed_at]
        if not after or after[-1].status not in TERMINAL:
            raise RuntimeError(f"run {run_id} did not end after its replica was killed")
        figures.resumed_s.append(_created(after[0]) - killed_at)
        figures.ended_s.append(_created(after[-1]) - killed_at)


class _Follower:
    """One run's Listen; `streaming` is set once it has streamed a few deltas."""

    def __init__(self, runs: run_pb2_grpc.RunServiceStub, run_id: str, timeout: float) -> None:
        self._runs = runs
        self._run_id = run_id
        self._timeout = timeout
        self.seen: list[run_pb2.StreamEvent] = []
        self.streaming = asyncio.Event()

    async def follow(self) -> None:
        request = run_pb2.ListenRunRequest(run_id=self._run_id)
        async for event in self._runs.Listen(request, timeout=self._timeout):
            self.seen.append(event)
            if event.type == run_pb2.StreamEvent.PARTIAL_MESSAGE and len(self.seen) >= 4:
                self.streaming.set()


def _created(event: run_pb2.StreamEvent) -> float:
    return float(event.created_at.ToNanoseconds()) / 1e9


async def _assistant(channel: grpc.aio.Channel) -> str:
    stub = assistant_pb2_grpc.AssistantServiceStub(channel)
    return str(
        (await stub.Create(assistant_pb2.CreateAssistantRequest(name="bench"), timeout=CALL_TIMEOUT)).id
    )


# ---- the whole benchmark -------------------------------------------------------------------


@dataclass
class Figures:
    throughput: Throughput
    latency: Latency
    failovers: list[Failover]
    postgres_version: str


def run_benchmark() -> Figures | None:
    """None when PostgreSQL is not installed (the benchmark says so and is skipped)."""
    if not available():
        print("replicas: PostgreSQL is not installed (apt-get install postgresql): skipped", flush=True)
        return None
    began = time.monotonic()

    def say(what: str) -> None:
        print(f"replicas: {what} ({time.monotonic() - began:.0f} s)", flush=True)

    with Cluster() as cluster:
        version = cluster.version()
        say(f"PostgreSQL {version} on 127.0.0.1:{cluster.cluster.port}")
        with contextlib.ExitStack() as stack:
            say("throughput, taking turns window by window")
            throughput = measure_throughput(cluster, stack)
            # On the two replicas of the throughput run (their database, now idle).
            say("Listen latency across replicas")
            pair = throughput.configs[2]
            a, b = pair.servers
            latency = asyncio.run(measure_latency(pair.dsn, a, b))
        failovers = []
        for lease, kills, runs in (
            (_mode.seconds(SHORT_LEASE, 1.0), _mode.sized(3, 1), _mode.sized(4, 1)),
            (DEFAULT_LEASE, 1, 4),
        ):
            if _mode.SMOKE and lease == DEFAULT_LEASE:
                continue  # a whole default lease is 30 s: not for a smoke run
            say(f"failover with --lease-seconds {lease:g}")
            failovers.append(asyncio.run(measure_failover(cluster.database(), lease, kills, runs)))
        say("done")
    return Figures(throughput, latency, failovers, version)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def _median_max(values: Sequence[float]) -> str:
    return f"{_median(values):.2f} / {max(values, default=0.0):.2f}"


def markdown(figures: Figures) -> str:
    configs = figures.throughput.configs
    base = configs[0]
    one = configs[1]
    lines = [
        "| configuration | runs/s | events/s | vs SQLite | vs 1 replica | CPU ms/run: servers | PostgreSQL "
        "| clients | cores busy | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        runs = _median(config.runs)
        versus_one = f"{runs / _median(one.runs):.2f}" if config is not base else ""
        postgres_ms = f"{config.median_cpu_ms_per_run('postgres'):.1f}" if config is not base else ""
        lines.append(
            f"| {config.name} | {runs:,.0f} | {_median(config.events):,.0f} "
            f"| {runs / _median(base.runs):.2f} "
            f"| {versus_one} | {config.median_cpu_ms_per_run('servers'):.1f} | {postgres_ms} "
            f"| {config.median_cpu_ms_per_run('clients'):.1f} | {config.cores_busy():.2f} | {config.errors} |"
        )
    latency = figures.latency
    lines += [
        "",
        "| Listen delivery, event's created_at -> listener | events | p50 (ms) | p99 (ms) |",
        "|---|---:|---:|---:|",
        f"| listener on the executing replica (baseline) | {len(latency.same_ms):,} "
        f"| {percentile(latency.same_ms, 0.5):.1f} | {percentile(latency.same_ms, 0.99):.1f} |",
        f"| listener on the other replica | {len(latency.cross_ms):,} "
        f"| {percentile(latency.cross_ms, 0.5):.1f} | {percentile(latency.cross_ms, 0.99):.1f} |",
        f"| other replica's listener after the executing one's | {len(latency.behind_ms):,} "
        f"| {percentile(latency.behind_ms, 0.5):.1f} | {percentile(latency.behind_ms, 0.99):.1f} |",
        "",
        "| failover after SIGKILL | lease (s) | runs | kill -> resumed: median / max (s) "
        "| kill -> run ended: median / max (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for failover in figures.failovers:
        name = "default lease" if failover.lease == DEFAULT_LEASE else "short lease"
        lines.append(
            f"| {name} (`--lease-seconds {failover.lease:g}`), {failover.kills} kill(s) | {failover.lease:g} "
            f"| {len(failover.resumed_s)} | {_median_max(failover.resumed_s)} "
            f"| {_median_max(failover.ended_s)} |"
        )
    return "\n".join(lines)


METHOD = """\
Spindle servers on 127.0.0.1 against a private PostgreSQL {version} cluster this benchmark
starts (on disk, fsync on, like the SQLite server's synchronous=FULL file; a fresh database for
each configuration), all on this machine's cores. Source: `bench/replicas.py`.

**Throughput.** A whole run: a thread created with one message, the run (builtin model, short
reply), Listen until the stream ends. Load: {clients} client processes (`bench/_replicas_client.py`,
grpc.aio, {concurrency} runs in flight each), client i pinned to replica i mod N, so Create,
the run's execution and its Listen are mostly on one replica. The SQLite server and PostgreSQL
with 1, 2 and 3 replicas are all up at once and take turns window by window ({windows} windows of
{window:g} s after a warm-up round, median). CPU is read from /proc for every process during
each window: the configuration's servers, the whole PostgreSQL cluster (postmaster, backends,
and backends that ended), the client processes; per run, median of the windows. "Cores busy" adds
them (and the idle servers) over the window: 2.0 is this machine.
"""

LATENCY_METHOD = """\
**Listen latency across replicas.** On the two replicas of the throughput run: runs created on
replica A (executed where they are claimed: A, which is woken by the Create; a run the other one
claimed first is counted the other way round, from its lease owner), each streaming {words}
events over {spread:g} s, {concurrent} at once; every run has one Listen on A and one on B from
one client process. Latency is the client's clock when a listener received an event minus the
event's `created_at` (stamped by the executing replica just before its transaction; one machine,
one clock). Events that existed before both streams were open are replay, not counted.
"""

FAILOVER_METHOD = """\
**Failover.** Two replicas on a fresh database (one per lease setting); runs created on
replica A ({runs}), each streaming {words} events over 2 s, with their listeners on replica B.
Once each has streamed a few events, A is killed with SIGKILL (then started again for the next
kill). Resumed: from the kill to the `created_at` of the first event B's engine appended (the
recovery event, written when it takes the run over after the lease ran out); ended: to the run's
terminal event (the model call is retried from the start, so this adds the 2 s stream). The
runs are killed within their first renewal interval, with nearly all of their lease left: the
worst case. A lease is renewed every lease/3, so a run killed later is taken over after 2/3 to all
of the lease, plus up to 0.5 s until the survivor's sweeper looks.
"""


def reading(figures: Figures) -> str:
    sqlite, one, two = figures.throughput.configs[:3]

    def cost(config: Config) -> float:
        return sum(config.median_cpu_ms_per_run(part) for part in ("servers", "postgres", "clients"))

    def split(config: Config) -> str:
        servers = "replicas" if len(config.servers) > 1 else "server"
        text = f"{servers} {config.median_cpu_ms_per_run('servers'):.1f}"
        if config is not sqlite:
            text += f", PostgreSQL {config.median_cpu_ms_per_run('postgres'):.1f}"
        return text + f", clients {config.median_cpu_ms_per_run('clients'):.1f}"

    busy = statistics.mean(config.cores_busy() for config in figures.throughput.configs)
    shared = (
        f" In this run they kept only {busy:.2f} cores busy on average: the machine was shared with "
        "other work, so the absolute runs/s are low, and a configuration with more processes gets a "
        "larger share of the cores (the scheduler shares CPU by thread); the CPU per run is what "
        "carries over."
        if busy < 1.6
        else ""
    )
    latency = figures.latency
    extra = percentile(latency.cross_ms, 0.5) - percentile(latency.same_ms, 0.5)
    return (
        "Reading it: the servers, PostgreSQL and the clients all share this machine's 2 cores, so "
        "runs/s is the CPU they get divided by the CPU one run costs across all of them."
        f"{shared} A run costs {cost(sqlite):.1f} ms of CPU on SQLite ({split(sqlite)}), "
        f"{cost(one):.1f} ms on PostgreSQL with one replica ({split(one)}), {cost(two):.1f} ms with "
        f"two ({split(two)})"
        + "".join(
            f" and {cost(more):.1f} ms with three ({split(more)})" for more in figures.throughput.configs[3:]
        )
        + ". PostgreSQL's "
        "backends are the cost SQLite does not have: each write transaction is BEGIN, a round trip "
        "per statement, COMMIT, over twenty round trips for a whole run. **2 replicas vs 1: "
        f"{_median(two.runs) / _median(one.runs):.2f}**: roughly the ratio of the CPU the processes "
        f"got (cores busy {two.cores_busy():.2f} against {one.cores_busy():.2f}) times the inverse "
        f"ratio of what a run costs ({cost(one):.1f} / {cost(two):.1f} = {cost(one) / cost(two):.2f}). "
        "A second replica adds no core here and each run costs more: the same two cores are split "
        "between more processes and PostgreSQL backends, and a run pays for sharing the database "
        "(each NOTIFY hint wakes every replica, which reads a hinted run's new events when it has "
        "listeners or waiters for it, `watch_runs`; a run queued on one replica is now and then "
        "claimed by another's periodic claim, and its Listen then follows it through a NOTIFY and "
        "a read). Replicas are for availability and for machines with a core per "
        "replica; there runs/s grows with replicas until PostgreSQL's share of a run fills its "
        f"cores. Across replicas, a listener gets an event {extra:.1f} ms later at the median than "
        "one on the executing replica: the NOTIFY, then a read of the run's new rows. Both p99s "
        "include the scheduling delays of a machine shared with other work."
    )


def section(figures: Figures, machine: str, when: str, elapsed: float) -> str:
    throughput = figures.throughput
    latency = figures.latency
    failover_runs = "; ".join(
        f"{f.kills} kill(s) of {len(f.resumed_s) + f.not_on_victim} runs with a {f.lease:g} s lease"
        for f in figures.failovers
    )
    return (
        "## Replicas on one PostgreSQL\n\n"
        + METHOD.format(
            version=figures.postgres_version,
            clients=len(throughput.client_pids),
            concurrency=CONCURRENCY,
            windows=throughput.windows,
            window=throughput.window_seconds,
        )
        + "\n"
        + LATENCY_METHOD.format(
            words=LATENCY_WORDS, spread=_mode.seconds(2.0, 0.5), concurrent=LATENCY_CONCURRENT
        )
        + "\n"
        + FAILOVER_METHOD.format(runs=failover_runs, words=FAILOVER_WORDS)
        + f"\n{markdown(figures)}\n\n"
        + f"Runs the other replica executed in the latency test: {latency.other_executor} of "
        f"{latency.runs}.\n\n"
        + reading(figures)
        + "\n\n"
        + PROFILE
        + f"\nMeasured {when} on {machine}, PostgreSQL {figures.postgres_version}, "
        f"grpcio {grpc.__version__}; the whole benchmark took {elapsed:.0f} s.\n"
    )


PROFILE = """\
**Profile** (py-spy, 200 Hz for 10 s, on the replicas under this load with 1 and 2 replicas).
About half of a replica's samples are native code under the event loop (grpc's and asyncpg's
Cython, protobuf); of the Python, the store's calls into asyncpg lead (`PostgresStore._write`
20-23% inclusive, `_read` 6-9%), then the interceptor's unary path (13-18%) and the engine's run
tasks (10-14%). Found and changed (store/postgres.py): asyncpg's pool reset every connection on
release (`Connection.reset`: one more round trip running `pg_advisory_unlock_all(); CLOSE ALL;
UNLISTEN *; RESET ALL` after every store call), 8.6% of a replica's samples, though the store
keeps no session state; it now resets nothing. And a write's events went in by executemany with
the NOTIFY hint in a second statement; now one statement does both. Before/after, 1 replica, the
same load, taking turns window by window, two runs: PostgreSQL CPU per run 3.9 -> 3.4 ms and
4.8 -> 3.7 ms (-12%, -23%), the replica's 6.7 -> 6.3 ms and 7.6 -> 7.5 ms. With 2 replicas, the
cross-replica fan-out (`pg_fanout` reading hinted runs) is 1.7% of a replica's samples.
"""
