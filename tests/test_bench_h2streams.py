"""bench/_h2streams.py's checks (issue 11): h2load drains the fan-out benchmark's streams and counts
any HTTP 200 as a success, while gRPC answers errors with HTTP 200 too, so the figures are only as
good as `Drained.check`. Against the real bare stream server: streams read whole pass, with their
exact bytes and with a payload in messages of any number (ListenBatches' shape, whose message
count it recovers); a method that answers UNIMPLEMENTED and streams of another size are caught.
Bounded by count, loopback only; nothing about speed is asserted."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator

import pytest

from bench import _h2streams, h2load
from bench._server import ServedProcess

pytestmark = [
    pytest.mark.skipif(
        shutil.which(h2load.H2LOAD) is None, reason="h2load (nghttp2-client) is not installed"
    ),
    pytest.mark.sqlite_only,  # no Spindle store involved
]

STREAM = "/bench.Streams/Stream"
MESSAGES, SIZE = 50, 80


@pytest.fixture(scope="module")
def bare() -> Iterator[ServedProcess]:
    with ServedProcess([sys.executable, "-m", "bench.stream_server"]) as served:
        yield served


def test_streams_read_whole_pass(bare: ServedProcess) -> None:
    drained = _h2streams.drain(bare.address, STREAM, f"{MESSAGES}:{SIZE}".encode(), 2, 3)
    assert drained.streams == 6
    drained.check(stream_bytes=MESSAGES * (SIZE + 5))
    # The same bytes read as a payload in 5-byte-prefixed messages: it finds how many there were.
    assert drained.check(payload=MESSAGES * SIZE) == 6 * MESSAGES


def test_grpc_errors_in_http_200_are_caught(bare: ServedProcess) -> None:
    drained = _h2streams.drain(bare.address, "/bench.Streams/NoSuchMethod", b"1:1", 1, 2)
    assert drained.window.status_2xx == 2  # what h2load alone would call 2 successes
    with pytest.raises(RuntimeError, match="bytes"):
        drained.check(stream_bytes=SIZE + 5)


def test_streams_of_another_size_are_caught(bare: ServedProcess) -> None:
    drained = _h2streams.drain(bare.address, STREAM, f"{MESSAGES}:{SIZE}".encode(), 1, 2)
    with pytest.raises(RuntimeError, match="bytes"):
        drained.check(stream_bytes=MESSAGES * (SIZE + 5) + 1)
    with pytest.raises(RuntimeError, match="5-byte-prefixed"):
        drained.check(payload=MESSAGES * SIZE + 1)
