"""Listener processes for the streaming benchmarks: the load comes from these, never from the
server's own process, and the same code drives Spindle's Listen and the bare baseline.

`python -m bench._listeners` reads a SPEC (one JSON line) on stdin, connects, prints `{"event":
"ready"}`, waits for a line on stdin, then does SPEC's `mode` and prints one JSON line per phase,
then `{"event": "idle"}`, and reads the next SPEC: the processes are kept and reused
(`Listeners`), so a phase does not pay for a Python start.

- drain: open `streams` calls at once and read them to their end (raw bytes, no decoding).
- attach: open `streams` calls and wait until each has its `attached` message (Spindle: the
  run's TOOL_CALLS event, alone or in a batch; baseline: its first message), print `attached`;
  then, with `follow`, read them to their end and print the latency of every later message (now
  minus the stamp it carries: the created_at of each text event, one a message for Listen and
  all of a batch's for ListenBatches, or the baseline's packed time); without, hold them open until
  the next line on stdin.
- first-delta / live: Spindle only, one run at a time, see `_first_delta` and `_live`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grpc

from spindle.v1 import message_pb2, run_pb2, run_pb2_grpc, thread_pb2, thread_pb2_grpc

LISTEN = "/spindle.v1.RunService/Listen"
BATCHES = "/spindle.v1.RunService/ListenBatches"
BUCKET_MS = 0.1  # latency histograms count in steps of 0.1 ms


def _emit(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def _line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _channel(spec: dict[str, Any]) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(spec["address"], options=[("grpc.max_concurrent_streams", 1 << 20)])


def _open(channel: grpc.aio.Channel, spec: dict[str, Any]) -> grpc.aio.UnaryStreamCall:
    method = channel.unary_stream(spec["method"])
    return method(bytes.fromhex(spec["request"]))


async def _drain(spec: dict[str, Any], channel: grpc.aio.Channel) -> None:
    async def one() -> int:
        count = 0
        async for _ in _open(channel, spec):
            count += 1
        return count

    start = time.time()
    results = await asyncio.gather(*(one() for _ in range(spec["streams"])), return_exceptions=True)
    end = time.time()
    counts = [r for r in results if isinstance(r, int)]
    errors = [str(r) for r in results if not isinstance(r, int)]
    _emit({"messages": sum(counts), "start": start, "end": end, "errors": len(errors), "error": errors[:1]})


def _events(message: bytes, method: str) -> Sequence[run_pb2.StreamEvent]:
    """The Spindle events a message carries: one (Listen) or a batch (ListenBatches)."""
    if method == BATCHES:
        return run_pb2.StreamEventBatch.FromString(message).events
    return (run_pb2.StreamEvent.FromString(message),)


def _stamps(message: bytes, method: str) -> list[float]:
    """When each timed item of a message was made: the created_at of every text event it
    carries (Spindle), or the baseline's packed time."""
    if method not in (LISTEN, BATCHES):
        return [struct.unpack_from("<d", message)[0]]
    return [
        event.created_at.seconds + event.created_at.nanos / 1e9
        for event in _events(message, method)
        if event.type == run_pb2.StreamEvent.PARTIAL_MESSAGE
    ]


def _attached(message: bytes, method: str) -> bool:
    if method not in (LISTEN, BATCHES):
        return True
    return any(event.type == run_pb2.StreamEvent.TOOL_CALLS for event in _events(message, method))


async def _attach(spec: dict[str, Any], channel: grpc.aio.Channel) -> None:
    method = spec["method"]
    attached: asyncio.Queue[bool] = asyncio.Queue()
    latencies: Counter[int] = Counter()
    received = [0]  # messages read after attaching, over all streams
    reasons: Counter[str] = Counter()  # why streams were lost before they attached

    async def one() -> None:
        call = _open(channel, spec)
        is_attached = False
        try:
            async for message in call:
                if not is_attached:
                    if _attached(message, method):
                        is_attached = True
                        attached.put_nowait(True)
                    continue
                received[0] += 1
                now = time.time()
                for stamp in _stamps(message, method):
                    latencies[int((now - stamp) * 1000 / BUCKET_MS)] += 1
        except grpc.aio.AioRpcError as exc:
            if not is_attached:
                reasons[f"{exc.code().name}: {exc.details()}"[:200]] += 1
                attached.put_nowait(False)
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise
        else:
            if not is_attached:
                reasons["ended before attaching"] += 1
                attached.put_nowait(False)

    streams = [asyncio.ensure_future(one()) for _ in range(spec["streams"])]
    outcomes = [await attached.get() for _ in streams]
    lost = outcomes.count(False)
    _emit({"event": "attached", "attached": outcomes.count(True), "lost": lost, "reasons": dict(reasons)})
    if not spec.get("follow"):
        await _line()
        for stream in streams:
            stream.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        return
    cpu = time.process_time()
    results = await asyncio.gather(*streams, return_exceptions=True)
    errors = [str(r) for r in results if r is not None]
    _emit(
        {
            "histogram": dict(latencies),
            "messages": received[0],
            "cpu": time.process_time() - cpu,  # this process's CPU seconds while following
            "errors": len(errors),
            "error": errors[:1],
        }
    )


async def _first_delta(spec: dict[str, Any], channel: grpc.aio.Channel) -> None:
    """Per run: the time from sending Create to the first PARTIAL_MESSAGE read by the stream
    (the thread is made first, outside the measured time). The runs take turns between Create
    then Listen, Create then ListenBatches, and CreateAndListen (one call, what the client SDK's
    create_and_stream makes): samples per method."""
    threads = thread_pb2_grpc.ThreadServiceStub(channel)
    runs = run_pb2_grpc.RunServiceStub(channel)
    samples: dict[str, list[float]] = {"Listen": [], "ListenBatches": [], "CreateAndListen": []}
    methods = list(samples)
    for number in range(spec["runs"] * len(samples)):
        method = methods[number % len(methods)]
        thread = await threads.Create(
            thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text="hello there")])
        )
        create = run_pb2.CreateRunRequest(assistant_id=spec["assistant"], thread_id=thread.id)
        started = time.perf_counter()
        first = await _first_text(runs, method, create)
        samples[method].append((first - started) * 1000)
    _emit({"samples_ms": samples})


async def _first_text(
    runs: run_pb2_grpc.RunServiceStub, method: str, create: run_pb2.CreateRunRequest
) -> float:
    """When the first PARTIAL_MESSAGE of a run created by `create` was read (`method`'s way);
    the stream is read to its end."""
    first = None
    if method == "Listen":
        run = await runs.Create(create)
        async for event in runs.Listen(run_pb2.ListenRunRequest(run_id=run.id)):
            if first is None and event.type == run_pb2.StreamEvent.PARTIAL_MESSAGE:
                first = time.perf_counter()
    else:
        if method == "ListenBatches":
            run = await runs.Create(create)
            batches = runs.ListenBatches(run_pb2.ListenRunRequest(run_id=run.id))
        else:
            batches = runs.CreateAndListen(create)
        async for batch in batches:
            if first is None and any(e.type == run_pb2.StreamEvent.PARTIAL_MESSAGE for e in batch.events):
                first = time.perf_counter()
    assert first is not None, "the run streamed no text"
    return first


async def _live(spec: dict[str, Any], channel: grpc.aio.Channel) -> None:
    """One run of `words` words, listened to live from its creation: text deltas (words) per
    second from sending Create to reading the last delta, and the events that carried them."""
    threads = thread_pb2_grpc.ThreadServiceStub(channel)
    runs = run_pb2_grpc.RunServiceStub(channel)
    text = " ".join(f"w{i}" for i in range(spec["words"]))
    thread = await threads.Create(
        thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text=text)])
    )
    first = time.perf_counter()
    run = await runs.Create(run_pb2.CreateRunRequest(assistant_id=spec["assistant"], thread_id=thread.id))
    words = deltas = 0
    last = first
    async for event in runs.Listen(run_pb2.ListenRunRequest(run_id=run.id)):
        if event.type == run_pb2.StreamEvent.PARTIAL_MESSAGE:
            last = time.perf_counter()
            deltas += 1
            words += len(event.message_delta.text.split())
    _emit({"words": words, "events": deltas, "seconds": last - first})


MODES = {"drain": _drain, "attach": _attach, "first-delta": _first_delta, "live": _live}


async def main() -> None:
    while line := await _line():
        spec = json.loads(line)
        channel = _channel(spec)
        await channel.channel_ready()
        _emit({"event": "ready"})
        await _line()
        await MODES[spec["mode"]](spec, channel)
        await channel.close()
        _emit({"event": "idle"})


IDLE_SECONDS = 60.0  # how long a finished phase may take to wind down before its process is killed


class _Process:
    """A listener process and the lines it printed (read by a thread of its own, so that a wait
    for a line can time out)."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench._listeners"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put("")  # it ended

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def read(self, timeout: float | None = None) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        if not line:
            raise RuntimeError(f"listener process {self.popen.pid} ended early")
        message: dict[str, Any] = json.loads(line)
        return message

    def wound_down(self) -> bool:
        """It finished its spec (`idle`) within IDLE_SECONDS, with no line left unread."""
        try:
            return self.read(IDLE_SECONDS).get("event") == "idle"
        except (queue.Empty, RuntimeError):
            return False

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                pipe.close()


_idle: list[_Process] = []  # processes that finished their spec, to reuse


class Listeners:
    """``with Listeners(specs) as group:`` one process per spec, all ready; `group.go()` starts
    them at once and `group.read()` collects each one's next JSON line. Processes that end their
    spec cleanly are kept for the next group; any other is killed."""

    def __init__(self, specs: Sequence[dict[str, Any]]) -> None:
        self._processes = [_idle.pop() if _idle else _Process() for _ in specs]
        for process, spec in zip(self._processes, specs, strict=True):
            process.send(json.dumps(spec))

    def __enter__(self) -> Listeners:
        for message in self.read():
            assert message.get("event") == "ready", message
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        for process in self._processes:
            if exc_type is None and process.wound_down():
                _idle.append(process)
            else:
                process.stop()

    def go(self) -> None:
        for process in self._processes:
            process.send("go")

    def read(self) -> list[dict[str, Any]]:
        return [process.read() for process in self._processes]


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
