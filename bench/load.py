"""Load: waves of concurrent runs on one server, each followed by several listeners (one joins
late, from an index), with plain replies, tool rounds and cancels at random (seeded) points.

Shared by tests/test_load.py (which records what every listener saw and checks the invariants)
and `make bench` (which reports runs/s, events/s, create->terminal latency and server memory).
Everything is driven with grpc.aio from one process, over a few connections.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf.message import Message

from bench import _mode
from spindle.v1 import (
    assistant_pb2,
    assistant_pb2_grpc,
    common_pb2,
    message_pb2,
    run_pb2,
    run_pb2_grpc,
    thread_pb2,
    thread_pb2_grpc,
)

EventType = run_pb2.StreamEvent
TERMINAL = frozenset(
    {run_pb2.COMPLETED, run_pb2.FAILED, run_pb2.CANCELLED, run_pb2.INCOMPLETE, run_pb2.EXPIRED}
)
CALL_TIMEOUT = 120.0  # failure bounds only: a loaded machine may be slow, never this slow
# A listener gives up on a run that does not end within this (a stuck run): what it saw is kept,
# and the invariant checker then names the run and its status.
LISTEN_TIMEOUT = 120.0
CONNECTIONS = 4


@dataclass(frozen=True)
class Shape:
    runs_per_wave: int = 300
    listeners: int = 3  # per run: two from index 0 at once, the rest join late from an index
    tool_share: float = 0.3
    cancel_share: float = 0.2
    seed: int = 8


class Seen(Protocol):
    events: list[run_pb2.StreamEvent]


class Recorder(Protocol):
    """Where each listener's events go (tests/support/invariants.History fits)."""

    def listener(self, run_id: str, start: int = 0) -> Seen: ...

    def answered(self, request_id: str, response: Message) -> None: ...


@dataclass
class _Seen:
    run_id: str
    start: int
    events: list[run_pb2.StreamEvent] = field(default_factory=list)


class Counter:
    """A Recorder that keeps only counts (the benchmark's)."""

    def __init__(self) -> None:
        self.seen: list[_Seen] = []

    def listener(self, run_id: str, start: int = 0) -> Seen:
        seen = _Seen(run_id, start)
        self.seen.append(seen)
        return seen

    def answered(self, request_id: str, response: Message) -> None:
        return None


@dataclass(frozen=True)
class Plan:
    """What the driver does to one run."""

    text: str
    tools: bool
    cancel_at: int | None  # cancel once this many events were seen (0: right after Create)
    late_after: int  # the late listener joins after this many events, from a random index
    retry_submit: bool  # send the tool results twice with one request_id


@dataclass
class Wave:
    run_ids: list[str]
    seconds: float
    events: int  # delivered to listeners, all of them together
    latencies: list[float]  # create -> the first listener saw the terminal event

    @property
    def runs_per_second(self) -> float:
        return len(self.run_ids) / self.seconds

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds


def plans(shape: Shape, wave: int) -> list[Plan]:
    rng = random.Random(shape.seed * 1000 + wave)
    made = []
    for index in range(shape.runs_per_wave):
        tools = rng.random() < shape.tool_share
        cancel = rng.random() < shape.cancel_share
        words = " ".join(f"w{index}_{i}" for i in range(rng.randint(3, 40)))
        if tools:
            lines = rng.choice([1, 1, 2])
            text = "\n".join(f'/tool get_weather {{"city": "c{index}_{i}"}}' for i in range(lines))
        elif cancel:
            text = f"/sleep {rng.uniform(0.05, 0.5):.2f} {words}"  # streams long enough to be cut
        else:
            text = words
        made.append(
            Plan(
                text=text,
                tools=tools,
                cancel_at=rng.choice([0, 1, 2, 3, 5, 8]) if cancel else None,
                late_after=rng.randint(0, 6),
                retry_submit=rng.random() < 0.25,
            )
        )
    return made


class Driver:
    def __init__(
        self, address: str, recorder: Recorder, shape: Shape, listen_timeout: float = LISTEN_TIMEOUT
    ) -> None:
        self.listen_timeout = listen_timeout
        self.gave_up: set[str] = set()  # runs a listener stopped waiting for
        # Separate connections (a local subchannel pool each), as separate clients would have.
        self._channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CONNECTIONS)
        ]
        self._recorder = recorder
        self.shape = shape
        self._assistant = ""

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def setup(self) -> None:
        stub = assistant_pb2_grpc.AssistantServiceStub(self._channels[0])
        request = assistant_pb2.CreateAssistantRequest(name="load")
        request.tools.add().function.name = "get_weather"
        self._assistant = (await stub.Create(request, timeout=CALL_TIMEOUT)).id

    async def wave(self, number: int) -> Wave:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(self._one(index, plan) for index, plan in enumerate(plans(self.shape, number)))
        )
        seconds = time.perf_counter() - started
        return Wave(
            run_ids=[run_id for run_id, _, _ in results],
            seconds=seconds,
            events=sum(events for _, events, _ in results),
            latencies=[latency for _, _, latency in results],
        )

    async def _one(self, index: int, plan: Plan) -> tuple[str, int, float]:
        channel = self._channels[index % len(self._channels)]
        runs = run_pb2_grpc.RunServiceStub(channel)
        threads = thread_pb2_grpc.ThreadServiceStub(channel)
        thread = await threads.Create(
            thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text=plan.text)]),
            timeout=CALL_TIMEOUT,
        )
        started = time.perf_counter()
        run = await runs.Create(
            run_pb2.CreateRunRequest(assistant_id=self._assistant, thread_id=thread.id), timeout=CALL_TIMEOUT
        )
        follow = _Follow(self, runs, run.id, plan)
        if plan.cancel_at == 0:
            await follow.cancel()
        listeners = [follow.listen(0, control=True), follow.listen(0)]
        listeners += [follow.join_late() for _ in range(self.shape.listeners - 2)]
        await asyncio.gather(*listeners)
        return run.id, follow.delivered, follow.finished - started


class _Follow:
    """The listeners of one run; the first one also acts on what it sees."""

    def __init__(self, driver: Driver, runs: run_pb2_grpc.RunServiceStub, run_id: str, plan: Plan) -> None:
        self._driver = driver
        self._runs = runs
        self._run_id = run_id
        self._plan = plan
        self._seen = 0  # events the controlling listener has seen
        self._progress = asyncio.Event()
        self._cancelled = False
        self._rounds = 0
        self.delivered = 0
        self.finished = 0.0

    async def listen(self, start: int, *, control: bool = False) -> None:
        record = self._driver._recorder.listener(self._run_id, start)
        request = run_pb2.ListenRunRequest(run_id=self._run_id, events_start_idx=start)
        try:
            async for event in self._runs.Listen(request, timeout=self._driver.listen_timeout):
                record.events.append(event)
                self.delivered += 1
                if control:
                    await self._act(event)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            self._driver.gave_up.add(self._run_id)
        if control:
            self.finished = time.perf_counter()
            self._progress.set()

    async def join_late(self) -> None:
        while self._seen < self._plan.late_after and not self.finished:
            self._progress.clear()
            await self._progress.wait()
        rng = random.Random(f"{self._run_id}")
        await self.listen(rng.randint(0, self._seen))

    async def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            await self._runs.Cancel(run_pb2.CancelRunRequest(run_id=self._run_id), timeout=CALL_TIMEOUT)

    async def _act(self, event: run_pb2.StreamEvent) -> None:
        self._seen += 1
        self._progress.set()
        if self._plan.cancel_at is not None and self._seen >= self._plan.cancel_at:
            await self.cancel()
        elif event.type == EventType.TOOL_CALLS and not self._cancelled:
            await self._submit(event.tool_calls.tool_calls)

    async def _submit(self, calls: Sequence[common_pb2.ToolCall]) -> None:
        self._rounds += 1
        request_id = f"load-{self._run_id}-{self._rounds}"
        request = run_pb2.SubmitToolResultsRequest(run_id=self._run_id, request_id=request_id)
        for call in calls:
            request.tool_results.add(tool_call_id=call.id, output=f'{{"for": "{call.id}", "temp": 21}}')
        for _ in range(2 if self._plan.retry_submit else 1):
            answer = await self._runs.SubmitToolResults(request, timeout=CALL_TIMEOUT)
            self._driver._recorder.answered(request_id, answer)


def rss_kib(pid: int) -> int:
    """The process's resident set (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


@dataclass
class Figures:
    waves: list[Wave]
    rss_start_kib: int
    rss_warm_kib: int
    rss_end_kib: int
    server_cpu_seconds: float  # over the waves after the warm-up

    @property
    def server_cpu_ms_per_run(self) -> float:
        runs = sum(len(w.run_ids) for w in self.measured)
        return 1000 * self.server_cpu_seconds / runs if runs else 0.0

    @property
    def measured(self) -> list[Wave]:
        return self.waves[1:] or self.waves  # the first wave is the warm-up

    @property
    def runs_per_second(self) -> float:
        return statistics.median(w.runs_per_second for w in self.measured)

    @property
    def events_per_second(self) -> float:
        return statistics.median(w.events_per_second for w in self.measured)

    def latency_ms(self, share: float) -> float:
        return 1000 * percentile([x for w in self.measured for x in w.latencies], share)


async def drive(
    address: str,
    pid: int,
    recorder: Recorder,
    shape: Shape,
    waves: int,
    listen_timeout: float = LISTEN_TIMEOUT,
) -> Figures:
    """`waves` waves of `shape.runs_per_wave` concurrent runs, one after the other; the first is
    the warm-up. RSS is read before the load, after the warm-up and after the last wave."""
    driver = Driver(address, recorder, shape, listen_timeout)
    try:
        await driver.setup()
        start = rss_kib(pid)
        done = [await driver.wave(0)]
        warm, cpu = rss_kib(pid), cpu_seconds(pid)
        for number in range(1, waves):
            if driver.gave_up:
                break  # a run got stuck: no use loading more (the caller sees fewer waves)
            done.append(await driver.wave(number))
        return Figures(done, start, warm, rss_kib(pid), cpu_seconds(pid) - cpu)
    finally:
        await driver.close()


def waves() -> int:
    """`make bench`'s waves (the first is the warm-up)."""
    return _mode.sized(6, 2)


def bench_shape() -> Shape:
    """`make bench`'s shape: Shape() in full, a small wave in a smoke run."""
    return Shape(runs_per_wave=_mode.sized(Shape.runs_per_wave, 20))


def run_benchmark(shape: Shape | None = None, count: int | None = None) -> Figures:
    from bench._server import BenchServer

    with BenchServer() as server:
        return asyncio.run(
            drive(server.address, server.pid, Counter(), shape or bench_shape(), count or waves())
        )


METHOD = """\
One server (SQLite, builtin model, default flags: at most 64 runs executing at once) and one
grpc.aio client process on 127.0.0.1, {connections} connections, on the same cores. {waves} waves,
one after the other, each of {runs} runs started at once (a thread with one message, then the
run): {tools:.0%} call a tool (one or two parallel calls) and get their results back (a quarter
of them sent twice with one request_id), the others reply with 3-40 words; independently,
{cancels:.0%} are cancelled at a random point (right after Create, or after 1-8 events; those
without a tool stream over 0.05-0.5 s so the cancel can land mid-stream). Each run has
{listeners} listeners: two Listen from index 0 at once, the rest join after a random number of
events from a random index. Latency is from Create to the moment the first listener saw the
terminal event, tool rounds and the queue for an execution slot included. Figures are the
median of the waves after the first (the warm-up). There is no bare-gRPC baseline for this
shape; server CPU per run says what it costs. The same shape in four waves is
`tests/test_load.py`, which checks every invariant over what the listeners saw and that memory
stays flat. Source: `bench/load.py`.
"""


def markdown(figures: Figures, shape: Shape) -> str:
    measured = figures.measured
    lines = [
        "| figure | value |",
        "|---|---:|",
        f"| waves measured (after one warm-up wave) | {len(measured)} |",
        f"| runs/s (median of waves) | {figures.runs_per_second:,.0f} |",
        f"| events/s delivered to listeners (median of waves) | {figures.events_per_second:,.0f} |",
        f"| create -> terminal p50 (ms) | {figures.latency_ms(0.50):,.0f} |",
        f"| create -> terminal p99 (ms) | {figures.latency_ms(0.99):,.0f} |",
        f"| server CPU per run, its calls and listeners included (ms) "
        f"| {figures.server_cpu_ms_per_run:.1f} |",
        f"| server RSS at start (MiB) | {figures.rss_start_kib / 1024:.1f} |",
        f"| server RSS after the warm-up wave (MiB) | {figures.rss_warm_kib / 1024:.1f} |",
        f"| server RSS at the end (MiB) | {figures.rss_end_kib / 1024:.1f} |",
    ]
    return "\n".join(lines)


def section(figures: Figures, shape: Shape, machine: str, when: str, elapsed: float) -> str:
    method = METHOD.format(
        connections=CONNECTIONS,
        waves=len(figures.waves),
        runs=shape.runs_per_wave,
        tools=shape.tool_share,
        cancels=shape.cancel_share,
        listeners=shape.listeners,
    )
    return (
        f"## Load: waves of concurrent runs with several listeners each\n\n{method}\n"
        f"{markdown(figures, shape)}\n\n"
        f"Measured {when} on {machine}; the whole benchmark took {elapsed:.0f} s.\n\n"
        f"Reading it: the server spends {figures.server_cpu_ms_per_run:.0f} ms of CPU per run (its "
        "calls, its turns and every event to every listener), so one core carries about "
        f"{1000 / max(figures.server_cpu_ms_per_run, 0.001):.0f} runs/s of this shape; the client "
        f"shares the cores. After the warm-up, RSS moved "
        f"{(figures.rss_end_kib - figures.rss_warm_kib) / 1024:+.1f} MiB over "
        f"{len(figures.measured) * shape.runs_per_wave} more runs.\n"
    )


if __name__ == "__main__":
    print(markdown(run_benchmark(), Shape()))
