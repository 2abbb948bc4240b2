"""How long after a run's terminal event does the caller learn about it?

Compares ``Run.wait()`` (rides ListenBatches) with the plain polling loops of the old SDKs (Get every
0.5 s and every 1 s) and with the server's Wait long-poll, on the same server in the same process.
Each sample is one run of the builtin model that streams its reply over a random 0.1-1.1 s
(``/sleep``), so a poller's phase against the run's end is uniform, as it is in real use. The
methods take turns sample by sample, one run at a time, so they share the same conditions.
Then the methods told by the server (``Run.wait()`` and the Wait long-poll) take turns over many
more, short runs: their latency does not depend on the run's length, and a p99 needs a hundred
samples or more to be more than the worst one.

Latency of a sample = the wall-clock time when the method returned, minus the ``created_at`` of
the run's terminal event (stamped by the server on the same machine).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

import spindle
from bench import _mode

SEED = 20260


# Written when it was measured (as it says); `make bench` does not re-run this timeline.
PROFILE = """\
**Profile: where `Run.wait()`'s milliseconds go.** A timeline of 150 short runs (wall-clock stamps
in the server around the terminal commit, its publish to the feed, the ListenBatches yield and
the stream's end, the executor's end of the run, the Get's handler; in the client around the
event's arrival and the Get), p50 in ms after the terminal event's `created_at`: the commit's
transaction began at -0.16 (`created_at` is stamped inside it), committed (synchronous=FULL: the
fsync) at 0.65, published to the feed at 0.69, yielded by ListenBatches at 0.79; the executor's
bookkeeping (its write returns, the task ends, the slot is freed) takes 0.95-1.01, after the
yield; the client has the event at 1.13 (the stream's generator ends on the server at 1.16) and
sends the Get at 1.33; the Get's handler starts at 2.35 and answers at 2.44 (0.08 ms: the body
is read from the file, since the commit emptied the memory cache); the client has it at 2.83,
`wait()` returns at 2.89. The slow part is the Get's trip to the handler: 0.92 ms, where the
wait's first Get (right after Create) takes 0.49, in the same runs; the handler and the answer's
trip are 0.08 and 0.40 (first Get: 0.06 and 0.29).

What that Get is not slowed by (each an A/B in one process, runs taking turns): the stream
still open on its channel (a Get on a second channel, its own connection: 0.73 vs 0.40 to the
handler; from a second client process: 0.94 vs 0.55); the stream's teardown on the server (the
server kept the stream open 5 ms after the terminal event: 0.79 vs 0.93); the client's channel
spin thread (`SingleThreadedUnaryStream`: wait() p50 2.34 vs 2.41 ms, p99 the same within the
noise); BDP pings (`grpc.http2.bdp_probe` off: p50 2.24 vs 2.24). Ending the stream before the
Get is worse: cancelling it costs the client about 0.3 ms before the Get can go (p50 3.75 vs
3.88, p90 23 vs 14 under load), and reading its end first waits for the trailers, which come
about 0.8 ms after the event (p50 +0.3 ms). A Get costs what this one does whenever the
processes were idle a few milliseconds before it: back to back 0.82 ms p50, after 1 ms idle
0.79, after 5 ms 1.26, after 20 ms 1.63 (the wake-ups of the threads on the path on this
shared 2-core machine, as it seems), and the run's last events come about 5 ms apart. So
nothing the server or the client does after the terminal commit was found in the way: what
is left is the commit's fsync (0.65) and one more round trip than the server's Wait
long-poll, which the design fixes (Listen as the trigger, Get as the judge). A terminal
event that carried the finished Run would save that round trip (the Wait long-poll's p50 is
1.2-2.1 ms lower in the same runs); DONE carried the reply and usage, not the Run (below). Both methods'
p99 follow the machine's load, not the path: four whole runs of this benchmark at load average
3-6 gave wait() p50 2.9-4.5 ms (median 3.3), p99 17-93 ms and the Wait long-poll p50 1.7-2.3
ms, p99 22-53 ms; 200 runs in a quieter stretch, wait() p50 2.2 ms, p99 5.9 ms.

**Then: the terminal event carries the finished run.** DONE has `done.run` and a terminal STATUS
its `status_change.run`, filled by the store in the transaction that ends the run (equal to a Get
right after), and `wait()` ends on that event with no Get after it (ERROR, TOOL_CALLS and an
older server's DONE still trigger the Get): 2 calls per run instead of 3. Whole runs of this
benchmark, before and after, each with the Wait long-poll in the same run: before, wait() p50
2.3 and 3.4 ms, p99 16.7 and 59.4 (long-poll p50 1.4 and 2.1, p99 12.3 and 6.9): 1.6x the
long-poll's p50; after, p50 1.5 ms, p99 6.5 (long-poll 1.6, 6.8): level with it.
"""


def samples() -> int:
    return _mode.sized(25, 2)


def push_samples() -> int:
    """Further runs for the methods the server tells (no poller phase to spread)."""
    return _mode.sized(200, 2)


def short_reply_seconds() -> tuple[float, float]:
    return (_mode.seconds(0.02, 0.01), _mode.seconds(0.06, 0.02))


def reply_seconds() -> tuple[float, float]:
    """A reply streams over a random time spanning a whole 1 s polling interval: the poller's
    phase against the run's end is then uniform, as in real use (smoke: short replies)."""
    return (_mode.seconds(0.1, 0.02), _mode.seconds(1.1, 0.1))


class CallCounter(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Counts the calls a method makes."""

    def __init__(self) -> None:
        self.calls = 0

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self.calls += 1
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self.calls += 1
        return continuation(details, request)


Waiter = Callable[[spindle.Client, spindle.Run], None]
"""Blocks until the run is finished."""


def ride_listen(client: spindle.Client, run: spindle.Run) -> None:
    run.wait(timeout=30)


def poll_every(interval: float) -> Waiter:
    """The old SDKs' loop: Get, and sleep the interval until the status is terminal."""

    def poll(client: spindle.Client, run: spindle.Run) -> None:
        while not run.refresh().status.is_finished:
            time.sleep(interval)

    return poll


def server_long_poll(client: spindle.Client, run: spindle.Run) -> None:
    while not client.runs.wait(run.id, timeout=30).status.is_finished:
        pass


@dataclass
class Method:
    name: str
    wait: Waiter
    pushed: bool  # told by the server: also measured over the short runs
    latencies: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Row:
    name: str
    samples: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    calls_per_run: float


def percentile(values: list[float], share: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[share - 1]


def measure(address: str, count: int | None = None) -> list[Row]:
    methods = [
        Method("`Run.wait()` (ListenBatches, fallback Get)", ride_listen, pushed=True),
        Method("polling Get every 0.5 s", poll_every(0.5), pushed=False),
        Method("polling Get every 1 s", poll_every(1.0), pushed=False),
        Method("server `Wait` long-poll (`client.runs.wait`)", server_long_poll, pushed=True),
    ]
    counter = CallCounter()
    rng = random.Random(SEED)
    with spindle.Client(address, interceptors=[counter]) as client:
        assistant = client.assistants.create(name="bench").id
        rounds = [(methods, reply_seconds(), samples() if count is None else count)]
        rounds.append(([m for m in methods if m.pushed], short_reply_seconds(), push_samples()))
        for taking_turns, span, runs in rounds:
            for _ in range(runs):
                seconds = rng.uniform(*span)
                for method in taking_turns:
                    sample(client, counter, assistant, method, seconds)
    return [
        Row(
            m.name,
            len(m.latencies),
            percentile(m.latencies, 50) * 1000,
            percentile(m.latencies, 99) * 1000,
            statistics.fmean(m.latencies) * 1000,
            statistics.fmean(m.calls),
        )
        for m in methods
    ]


def sample(
    client: spindle.Client, counter: CallCounter, assistant: str, method: Method, seconds: float
) -> None:
    """One run whose reply streams over ``seconds``, waited for by ``method``."""
    text = f"/sleep {seconds:.3f}\nthe reply of a benchmark run"
    thread = client.threads.create(messages=[text])
    run = client.runs.create(thread_id=thread, assistant_id=assistant)
    before = counter.calls
    method.wait(client, run)
    returned = time.time()
    method.calls.append(counter.calls - before)
    terminal = list(run.listen(timeout=30))[-1]
    assert terminal.is_terminal and terminal.created_at is not None
    method.latencies.append(returned - terminal.created_at.timestamp())
