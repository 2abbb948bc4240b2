"""A refused call leaves nothing behind: its request, and the writes that shared its commit, are
freed when the call ends (reference counting), not at the cyclic collector's next full pass,
which the server's --gc-threshold makes rare."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from spindle.v1 import message_pb2
from support.server import ServerProcess
from support.stubs import Stubs

MISSING_THREAD = "thread_" + "0" * 24


def _resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _refuse(stubs: Stubs, count: int, text: str, code: grpc.StatusCode) -> None:
    for _ in range(count):
        with pytest.raises(grpc.RpcError) as refused:
            stubs.messages.Create(message_pb2.CreateMessageRequest(thread_id=MISSING_THREAD, text=text))
        assert refused.value.code() == code


def test_refused_creates_do_not_pile_up_in_memory(make_server: Callable[..., ServerProcess]) -> None:
    # The cyclic collector all but off: what a refusal left in a reference cycle would stay.
    server = make_server("--gc-threshold", "1000000000")
    assert server.process is not None
    stubs = Stubs.connect(server.address)
    try:
        unknown_thread = ("x" * 200_000, grpc.StatusCode.NOT_FOUND)  # refused by the store's write
        too_long = ("x" * 300_000, grpc.StatusCode.INVALID_ARGUMENT)  # refused by the checks
        for text, code in (unknown_thread, too_long):
            _refuse(stubs, 10, text, code)
        before = _resident_mb(server.process.pid)
        for text, code in (unknown_thread, too_long):
            _refuse(stubs, 60, text, code)
        # Kept, each would be at least its request's text and the message built from it: 60 x
        # (0.2 + 0.2) + 60 x 0.3 MB and more. Freed, the heap stays about where it was.
        assert _resident_mb(server.process.pid) - before < 20
    finally:
        stubs.close()
