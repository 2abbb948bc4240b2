"""Unary gRPC load from h2load (nghttp2's HTTP/2 load generator, Debian's `nghttp2-client`): one C
process that drives tens of thousands of calls a second, so the server, not the client, is what
is measured (one Python client process tops out near the echo server's own rate).

h2load speaks gRPC here with a pre-encoded request (the 5-byte length prefix and the protobuf,
`grpc_frame`), `content-type: application/grpc` and `te: trailers`. It counts any HTTP 200 as
a success, and gRPC answers its errors with HTTP 200 too (grpc-status in a Trailers-Only
response), so `Window.check` verifies what h2load cannot: every successful unary gRPC answer
carries its response message in DATA frames and an error carries none, so the DATA bytes h2load
received must equal the calls it counted times the framed response's size (taken from one call
made with a real gRPC client before the load). A single error, or a response of another size,
breaks the equality. Servers with metrics are also checked against their own count of calls by
status code (`bench.rpc`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

H2LOAD = "h2load"
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def available() -> bool:
    return shutil.which(H2LOAD) is not None


@dataclass(frozen=True)
class Load:
    """What one h2load run sends: `connections` HTTP/2 connections with `streams` calls in
    flight on each, for `seconds` (or, with `requests`, that many calls). No --warm-up-time:
    h2load then counts the warm-up's DATA bytes but not its calls, which would break
    `Window.check` (warm up with a run of its own)."""

    connections: int
    streams: int
    seconds: float
    requests: int | None = None

    @property
    def in_flight(self) -> int:
        return self.connections * self.streams

    def describe(self) -> str:
        connections = "connection" if self.connections == 1 else "connections"
        return f"h2load, {self.connections} {connections}, {self.streams} streams each"


@dataclass(frozen=True)
class Window:
    """One h2load run, parsed from its report."""

    per_second: float
    done: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    data_bytes: int

    def check(self, response_frame_bytes: int) -> None:
        """Every counted call was an HTTP 200 whose body was the whole expected response: no
        gRPC error (those have no body), no failed or refused stream."""
        problems = []
        if self.succeeded == 0:
            problems.append("no call succeeded")
        if self.failed or self.errored:
            problems.append(f"{self.failed} failed and {self.errored} errored requests")
        if self.status_2xx != self.succeeded:
            problems.append(f"{self.status_2xx} HTTP 2xx of {self.succeeded} succeeded")
        expected = self.succeeded * response_frame_bytes
        if self.data_bytes != expected:
            problems.append(
                f"{self.data_bytes} response bytes, expected {expected} ({self.succeeded} calls of "
                f"{response_frame_bytes} bytes): an answer of another size, or a gRPC error (no body)"
            )
        if problems:
            raise RuntimeError("h2load: " + "; ".join(problems))


def parse(report: str) -> Window:
    requests = _REQUESTS.search(report)
    finished = _FINISHED.search(report)
    traffic = _TRAFFIC.search(report)
    status = _STATUS.search(report)
    if not (requests and finished and traffic and status):
        raise RuntimeError(f"cannot read h2load's report:\n{report}")
    done, succeeded, failed, errored = (int(requests.group(n)) for n in (3, 4, 5, 6))
    return Window(
        per_second=float(finished.group(3)),
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        status_2xx=int(status.group(1)),
        data_bytes=int(traffic.group(3)),
    )


def run(address: str, method: str, request: bytes, load: Load) -> Window:
    """One h2load run of `method` ("/package.Service/Method") on `address` ("host:port") with
    the serialized `request`; its parsed report."""
    with tempfile.NamedTemporaryFile(prefix="spindle-h2load-", suffix=".grpc") as body:
        body.write(grpc_frame(request))
        body.flush()
        command = [
            H2LOAD,
            f"--clients={load.connections}",
            f"--max-concurrent-streams={load.streams}",
            *(
                [f"--requests={load.requests}"]
                if load.requests is not None
                else [f"--duration={max(1, round(load.seconds * 1000))}ms"]
            ),
            f"--data={Path(body.name)}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"http://{address}{method}",
        ]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=load.seconds + 120)
    if finished.returncode != 0:
        raise RuntimeError(f"h2load failed ({finished.returncode}): {finished.stderr or finished.stdout}")
    return parse(finished.stdout)
