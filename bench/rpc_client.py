"""One client process of the whole-run row (bench/rpc.py): from START_AT (a wall-clock time, so
that all processes start together) for SECONDS, CONCURRENCY loops each run thread + Create +
Listen to DONE; prints {"runs": N, "seconds": S} as JSON. FOLLOW: Listen (one event a message)
or ListenBatches (what the client SDK follows a run with: the events it has not sent yet in one
message), or `floor`: ADDRESS is then the bare echo server (bench/echo_server.py), and a "run"
is the same calls' shape there with no work behind them: the thread's and the run's Create
requests echoed back, and a stream of FLOOR_EVENTS messages of FLOOR_EVENT_BYTES bytes (what a
short reply's Listen sends).

`python -m bench.rpc_client ADDRESS ASSISTANT_ID START_AT SECONDS CONCURRENCY [FOLLOW]`
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc

from spindle.v1 import message_pb2, run_pb2, run_pb2_grpc, thread_pb2, thread_pb2_grpc

# A short reply's Listen in the whole-run row: 6 events of 57-240 bytes, 146 on average (two
# status changes carrying the run, two deltas, the message's end with usage... measured on the
# builtin model's "You said: one two three").
FLOOR_EVENTS = 6
FLOOR_EVENT_BYTES = 146


async def floor_runs(channel: grpc.aio.Channel, assistant_id: str, stop_at: float) -> int:
    """Whole runs' calls on the bare echo server: two unary calls and one stream, no work."""
    echo = channel.unary_unary("/bench.Echo/Echo")
    stream = channel.unary_stream("/bench.Echo/Stream")
    thread_request = thread_pb2.CreateThreadRequest(
        messages=[message_pb2.MessageInput(text="one two three")]
    ).SerializeToString()
    run_request = run_pb2.CreateRunRequest(
        assistant_id=assistant_id, thread_id="thread_x"
    ).SerializeToString()
    shape = f"{FLOOR_EVENTS}:{FLOOR_EVENT_BYTES}".encode()
    done = 0
    while time.perf_counter() < stop_at:
        await echo(thread_request)
        await echo(run_request)
        received = 0
        async for _ in stream(shape):
            received += 1
        if received != FLOOR_EVENTS:
            raise RuntimeError(f"the echo's stream sent {received} messages")
        done += 1
    return done


async def whole_runs(
    address: str, assistant_id: str, start_at: float, seconds: float, concurrency: int, follow: str
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        threads = thread_pb2_grpc.ThreadServiceStub(channel)
        runs = run_pb2_grpc.RunServiceStub(channel)
        await channel.channel_ready()

        async def loop(stop_at: float) -> int:
            if follow == "floor":
                return await floor_runs(channel, assistant_id, stop_at)
            done = 0
            while time.perf_counter() < stop_at:
                thread = await threads.Create(
                    thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text="one two three")])
                )
                run = await runs.Create(
                    run_pb2.CreateRunRequest(assistant_id=assistant_id, thread_id=thread.id)
                )
                last = None
                request = run_pb2.ListenRunRequest(run_id=run.id)
                if follow == "ListenBatches":
                    async for batch in runs.ListenBatches(request):
                        last = batch.events[-1]
                else:
                    async for event in runs.Listen(request):
                        last = event
                if last is None or last.type != run_pb2.StreamEvent.DONE:
                    raise RuntimeError(f"run {run.id} ended {last}")
                done += 1
            return done

        await asyncio.sleep(max(0.0, start_at - time.time()))
        started = time.perf_counter()
        counts = await asyncio.gather(*(loop(started + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    print(json.dumps({"runs": sum(counts), "seconds": elapsed}), flush=True)


if __name__ == "__main__":
    address, assistant_id, start_at, seconds, concurrency = sys.argv[1:6]
    follow = sys.argv[6] if len(sys.argv) > 6 else "Listen"
    asyncio.run(whole_runs(address, assistant_id, float(start_at), float(seconds), int(concurrency), follow))
