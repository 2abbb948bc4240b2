"""A load process of bench/replicas.py: whole runs against one server, window by window.

`python -m bench._replicas_client` reads one JSON command a line on stdin,
``{"address": ..., "assistant": ..., "seconds": ..., "concurrency": ...}``, runs whole runs
(a thread created with one message, the run, Listen until the stream ends) back to back,
`concurrency` at a time, for `seconds`, and answers with one JSON line
``{"runs": ..., "events": ..., "seconds": ..., "errors": ...}``. EOF ends it. Separate
processes, so the load generator is not one Python process's event loop.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc

from spindle.v1 import message_pb2, run_pb2, run_pb2_grpc, thread_pb2, thread_pb2_grpc

CALL_TIMEOUT = 60.0  # a failure bound only
TEXT = "one two three"  # the builtin model's short reply: "You said: one two three"


class Load:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]

    async def window(
        self, address: str, assistant: str, seconds: float, concurrency: int
    ) -> dict[str, float]:
        channel = self._channel(address)
        threads = thread_pb2_grpc.ThreadServiceStub(channel)
        runs = run_pb2_grpc.RunServiceStub(channel)
        started = time.perf_counter()
        stop_at = started + seconds
        totals = {"runs": 0, "events": 0, "errors": 0}

        async def loop() -> None:
            while time.perf_counter() < stop_at:
                try:
                    events = await one_run(threads, runs, assistant)
                except grpc.aio.AioRpcError:
                    totals["errors"] += 1
                    continue
                totals["runs"] += 1
                totals["events"] += events

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return {**totals, "seconds": time.perf_counter() - started}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


async def one_run(
    threads: thread_pb2_grpc.ThreadServiceStub, runs: run_pb2_grpc.RunServiceStub, assistant: str
) -> int:
    """One whole run; the events its Listen delivered."""
    thread = await threads.Create(
        thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text=TEXT)]), timeout=CALL_TIMEOUT
    )
    run = await runs.Create(
        run_pb2.CreateRunRequest(assistant_id=assistant, thread_id=thread.id), timeout=CALL_TIMEOUT
    )
    events = 0
    async for _ in runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=CALL_TIMEOUT):
        events += 1
    return events


async def main() -> None:
    load = Load()
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return
            command = json.loads(line)
            answer = await load.window(
                command["address"],
                command["assistant"],
                float(command["seconds"]),
                int(command["concurrency"]),
            )
            print(json.dumps(answer), flush=True)
    finally:
        await load.close()


if __name__ == "__main__":
    asyncio.run(main())
