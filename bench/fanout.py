"""Listen fan-out: events per second delivered to N listeners replaying one run's log, as a
ratio of a bare grpc.aio server streaming the same number of same-sized messages to N streams
(measured in the same run; the machines are shared and noisy, so the ratio is the figure).

The run is made by the builtin model with coalescing off (`--coalesce-ms 0`), so its log holds
one PARTIAL_MESSAGE event per word.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from bench._server import BenchServer, echo_server
from spindle.v1 import (
    assistant_pb2,
    assistant_pb2_grpc,
    message_pb2,
    run_pb2,
    run_pb2_grpc,
    thread_pb2,
    thread_pb2_grpc,
)

WORDS = 2_000
ROUNDS = 5
LISTENERS = (1, 50)


@dataclass(frozen=True)
class FanoutRow:
    listeners: int
    events: int
    per_second: float
    baseline: float

    @property
    def ratio(self) -> float:
        return self.per_second / self.baseline if self.baseline else 0.0


async def _drain(call: grpc.aio.UnaryStreamCall) -> int:
    count = 0
    async for _ in call:
        count += 1
    return count


async def _round(open_stream: Callable[[], grpc.aio.UnaryStreamCall], listeners: int) -> tuple[int, float]:
    """(messages per stream, messages/s) with `listeners` streams drained at once."""
    started = time.perf_counter()
    counts = await asyncio.gather(*(_drain(open_stream()) for _ in range(listeners)))
    return counts[0], sum(counts) / (time.perf_counter() - started)


async def measure(spindle_address: str, echo_address: str) -> list[FanoutRow]:
    channel = grpc.aio.insecure_channel(spindle_address)
    echo_channel = grpc.aio.insecure_channel(echo_address)
    runs = run_pb2_grpc.RunServiceStub(channel)
    assistant = await assistant_pb2_grpc.AssistantServiceStub(channel).Create(
        assistant_pb2.CreateAssistantRequest(name="fanout")
    )
    text = " ".join(f"w{i}" for i in range(WORDS))
    thread = await thread_pb2_grpc.ThreadServiceStub(channel).Create(
        thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text=text)])
    )
    run = await runs.Create(run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id))
    log = [event async for event in runs.Listen(run_pb2.ListenRunRequest(run_id=run.id))]
    delta = next(e for e in log if e.type == run_pb2.StreamEvent.PARTIAL_MESSAGE)
    stream = echo_channel.unary_stream("/bench.Echo/Stream")
    # The baseline streams len(log) messages the size of one delta event.
    baseline_request = f"{len(log)}:{delta.ByteSize()}".encode()

    rows = []
    for listeners in LISTENERS:
        # Baseline and Listen take turns round by round, so load bursts hit both alike.
        baselines, spindles = [], []
        events = 0
        for _ in range(ROUNDS):
            baselines.append((await _round(lambda: stream(baseline_request), listeners))[1])
            events, rate = await _round(
                lambda: runs.Listen(run_pb2.ListenRunRequest(run_id=run.id)), listeners
            )
            spindles.append(rate)
        rows.append(FanoutRow(listeners, events, statistics.median(spindles), statistics.median(baselines)))
    await channel.close()
    await echo_channel.close()
    return rows


def run_benchmark() -> list[FanoutRow]:
    with BenchServer("--coalesce-ms", "0") as spindle, echo_server() as echo:
        return asyncio.run(measure(spindle.address, echo.address))


def markdown(rows: list[FanoutRow]) -> str:
    lines = [
        "| listeners | events each | events/s delivered | bare grpc.aio stream | ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.listeners} | {row.events} | {row.per_second:,.0f} | {row.baseline:,.0f} "
            f"| {row.ratio:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run_benchmark()))
