"""RPC speed of the Spindle server, as ratios against a bare grpc.aio echo server measured in the
same run (the machines are shared and noisy: absolute numbers mean little, ratios travel).

Each figure is calls per second from one grpc.aio client process with N calls in flight, over
a fixed wall-clock window, median of several windows.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from bench._server import BenchServer, echo_server
from spindle.v1 import (
    assistant_pb2,
    assistant_pb2_grpc,
    message_pb2,
    message_pb2_grpc,
    run_pb2,
    run_pb2_grpc,
    thread_pb2,
    thread_pb2_grpc,
)

WINDOW_SECONDS = 1.0
WINDOWS = 5
BASELINE = "bare grpc.aio echo (baseline)"


@dataclass(frozen=True)
class Row:
    name: str
    concurrency: int
    per_second: float
    baseline: float

    @property
    def ratio(self) -> float:
        return self.per_second / self.baseline if self.baseline else 0.0


async def rates(calls: dict[str, Callable[[], Awaitable[object]]], concurrency: int) -> dict[str, float]:
    """Median calls/s of each call over WINDOWS windows with `concurrency` calls in flight.

    The calls take turns window by window, so a burst of load from a neighbour on the shared
    machine lands on all of them alike instead of on whichever ran at that moment.
    """
    results: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(WINDOWS):
        for name, call in calls.items():
            started = time.perf_counter()
            stop_at = started + WINDOW_SECONDS
            counts = await asyncio.gather(*(_calls_until(call, stop_at) for _ in range(concurrency)))
            results[name].append(sum(counts) / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in results.items()}


async def _calls_until(call: Callable[[], Awaitable[object]], stop_at: float) -> int:
    done = 0
    while time.perf_counter() < stop_at:
        await call()
        done += 1
    return done


async def measure(spindle_address: str, echo_address: str) -> list[Row]:
    rows: list[Row] = []
    echo_channel = grpc.aio.insecure_channel(echo_address)
    channel = grpc.aio.insecure_channel(spindle_address)
    echo = echo_channel.unary_unary("/bench.Echo/Echo")
    payload = run_pb2.GetRunRequest(run_id="run_" + "0" * 24).SerializeToString()
    assistants = assistant_pb2_grpc.AssistantServiceStub(channel)
    threads = thread_pb2_grpc.ThreadServiceStub(channel)
    messages = message_pb2_grpc.MessageServiceStub(channel)
    runs = run_pb2_grpc.RunServiceStub(channel)

    assistant = await assistants.Create(assistant_pb2.CreateAssistantRequest(name="bench"))
    thread = await threads.Create(
        thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text="hi")])
    )
    run = await runs.Create(run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id))
    await runs.Wait(run_pb2.WaitRunRequest(run_id=run.id))

    async def echo_call() -> None:
        await echo(payload)

    async def get_run() -> None:
        await runs.Get(run_pb2.GetRunRequest(run_id=run.id))

    note_thread = await threads.Create(thread_pb2.CreateThreadRequest())

    async def add_message() -> None:
        await messages.Create(message_pb2.CreateMessageRequest(thread_id=note_thread.id, text="note"))

    async def full_run() -> None:
        new_thread = await threads.Create(
            thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text="one two three")])
        )
        started = await runs.Create(
            run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=new_thread.id)
        )
        async for _ in runs.Listen(run_pb2.ListenRunRequest(run_id=started.id)):
            pass

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        BASELINE: echo_call,
        "RunService.Get (read)": get_run,
        "MessageService.Create (durable write)": add_message,
        "whole run: thread + Create + Listen to DONE": full_run,
    }
    for concurrency in (1, 16):
        measured = await rates(calls, concurrency)
        rows.extend(Row(name, concurrency, value, measured[BASELINE]) for name, value in measured.items())
    await channel.close()
    await echo_channel.close()
    return rows


def run_benchmark() -> list[Row]:
    with BenchServer() as spindle, echo_server() as echo:
        return asyncio.run(measure(spindle.address, echo.address))


def markdown(rows: list[Row]) -> str:
    lines = [
        "| call | in flight | calls/s | vs bare echo |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row.name} | {row.concurrency} | {row.per_second:,.0f} | {row.ratio:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run_benchmark()))
