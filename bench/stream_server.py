"""The streaming baseline: a bare grpc.aio server (uvloop, raw bytes, no protobuf) with the
stream shapes Listen has, so each streaming row compares Spindle with what gRPC alone costs.

- Stream `COUNT:SIZE`: COUNT messages of SIZE bytes, as fast as the stream takes them (replay).
- Idle `SIZE`: one message, then nothing until the client goes (an idle listener).
- Tick `SIZE`: one message at once (subscribed), then, from the next Start on, every tick of
  the shared ticker: an 8-byte wall-clock stamp padded to SIZE bytes (one run, many listeners).
- Start `COUNT:INTERVAL_MS`: runs the shared ticker: COUNT ticks, INTERVAL_MS apart; then every
  Tick stream ends.
- Subscribers: how many Tick streams are open (so a load generator that reports nothing until
  the end, h2load, can be seen attached).

Run as `python -m bench.stream_server`; it prints its port like spindle-server does.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator

import grpc

from bench._bare import serve


class Ticker:
    """One shared log of ticks, each stream at its own position (like Spindle's run feeds)."""

    def __init__(self) -> None:
        self.ticks: list[bytes] = []
        self.ended = False
        self.changed = asyncio.Event()

    def push(self, tick: bytes | None) -> None:
        if tick is None:
            self.ended = True
        else:
            self.ticks.append(tick)
        self.changed.set()
        self.changed = asyncio.Event()


_ticker = Ticker()
_subscribers = 0


async def _stream(request: bytes, _: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    count, size = (int(part) for part in request.decode().split(":"))
    message = b"x" * size
    for _ in range(count):
        yield message


async def _idle(request: bytes, _: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"x" * int(request.decode())
    await asyncio.get_running_loop().create_future()  # until the call is cancelled


async def _tick(request: bytes, _: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    global _subscribers
    size = int(request.decode())
    ticker = _ticker
    position = len(ticker.ticks)
    _subscribers += 1
    try:
        yield b"attached".ljust(size, b"x")  # the client knows it is subscribed
        while True:
            changed = ticker.changed
            while position < len(ticker.ticks):
                yield ticker.ticks[position].ljust(size, b"x")
                position += 1
            if ticker.ended:
                return
            await changed.wait()
    finally:
        _subscribers -= 1


async def _subscribers_now(_: bytes, __: grpc.aio.ServicerContext) -> bytes:
    return str(_subscribers).encode()


async def _start(request: bytes, _: grpc.aio.ServicerContext) -> bytes:
    global _ticker
    count, interval_ms = (int(part) for part in request.decode().split(":"))
    ticker = _ticker
    loop = asyncio.get_running_loop()
    begin = loop.time()
    for number in range(count):
        await asyncio.sleep(max(begin + number * interval_ms / 1000 - loop.time(), 0.0))
        ticker.push(struct.pack("<d", time.time()))
    ticker.push(None)
    _ticker = Ticker()
    return b""


def options() -> list[tuple[str, int]]:
    """Room for the 10,000-stream burst, as Spindle's defaults give it (grpc's own refuse it)."""
    return [
        ("grpc.max_concurrent_streams", 1 << 20),
        ("grpc.server.max_pending_requests", 1 << 20),
        ("grpc.server.max_pending_requests_hard_limit", 1 << 20),
    ]


def main() -> None:
    handlers = {
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Idle": grpc.unary_stream_rpc_method_handler(_idle),
        "Tick": grpc.unary_stream_rpc_method_handler(_tick),
        "Start": grpc.unary_unary_rpc_method_handler(_start),
        "Subscribers": grpc.unary_unary_rpc_method_handler(_subscribers_now),
    }
    serve("bench.Streams", handlers, options())


if __name__ == "__main__":
    main()
