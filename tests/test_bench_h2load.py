"""bench/h2load.py's check (issue 11): h2load counts every HTTP 200 as a success and gRPC answers
its errors with HTTP 200, so the benchmark's figures are only as good as `Window.check`. Against
the real echo server: whole answers pass; a method that answers UNIMPLEMENTED to every call (an
HTTP 200 to h2load) and an answer of another size than expected are both caught. Bounded by count
(h2load -n), loopback only; nothing about speed is asserted."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from bench import h2load
from bench._server import ServedProcess, echo_server

pytestmark = [
    pytest.mark.skipif(
        shutil.which(h2load.H2LOAD) is None, reason="h2load (nghttp2-client) is not installed"
    ),
    pytest.mark.sqlite_only,  # no Spindle store involved
]

BODY = b"a request of some bytes"
LOAD = h2load.Load(connections=2, streams=4, seconds=0, requests=200)


@pytest.fixture(scope="module")
def echo() -> Iterator[ServedProcess]:
    with echo_server() as served:
        yield served


def test_whole_answers_pass(echo: ServedProcess) -> None:
    window = h2load.run(echo.address, "/bench.Echo/Echo", BODY, LOAD)
    assert window.succeeded == 200
    window.check(len(h2load.grpc_frame(BODY)))


def test_grpc_errors_in_http_200_are_caught(echo: ServedProcess) -> None:
    window = h2load.run(echo.address, "/bench.Echo/NoSuchMethod", BODY, LOAD)
    assert window.status_2xx == 200  # what h2load alone would report as 200 successes
    with pytest.raises(RuntimeError, match="gRPC error"):
        window.check(len(h2load.grpc_frame(BODY)))


def test_answers_of_another_size_are_caught(echo: ServedProcess) -> None:
    window = h2load.run(echo.address, "/bench.Echo/Echo", BODY, LOAD)
    with pytest.raises(RuntimeError, match="response bytes"):
        window.check(len(h2load.grpc_frame(BODY)) + 1)
