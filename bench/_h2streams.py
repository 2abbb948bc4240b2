"""Server-streaming gRPC calls held and drained by h2load (one C process), for the streaming rows
where Python readers would be the bottleneck: h2load reads every stream to its end and keeps
nothing but counts, so many streams cost the load generator little.

h2load sends the pre-encoded request (`bench.h2load.grpc_frame`) with `content-type:
application/grpc` and `te: trailers`, holds each call until the server ends it, and reports the
DATA bytes it received. Flow control never holds the server back: the stream and connection
windows are set to 2**30-1 bytes at the start (SETTINGS_INITIAL_WINDOW_SIZE and a connection
WINDOW_UPDATE), far more than any connection here receives (`Drained.check` verifies it), and
h2load consumes what it reads. h2load cannot see grpc-status (HTTP 200 either way), so every
caller checks the DATA bytes against what each stream must carry, and Spindle's own count of
calls by status code (`spindle_rpcs_total`).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench import h2load

WINDOW_BITS = 30
_TIME = re.compile(r"finished in ([\d.]+)(m?s),")


@dataclass(frozen=True)
class Drained:
    """One h2load run's report: every stream read to its end."""

    streams: int
    connections: int
    seconds: float
    data_bytes: int
    window: h2load.Window

    def check(self, *, stream_bytes: int | None = None, payload: int | None = None) -> int:
        """Every stream ended with a 200 and its bytes. `stream_bytes`: each stream carried exactly
        these bytes. `payload`: each stream carried these message bytes in messages of any
        number (a 5-byte gRPC prefix each, ListenBatches): returns the messages over all streams."""
        w = self.window
        problems = []
        if w.succeeded != self.streams or w.status_2xx != self.streams or w.failed or w.errored:
            problems.append(
                f"{w.succeeded} of {self.streams} streams succeeded ({w.status_2xx} HTTP 2xx, "
                f"{w.failed} failed, {w.errored} errored)"
            )
        if self.data_bytes / self.connections >= (1 << WINDOW_BITS) - 1:
            problems.append("a connection received more than its flow-control window")
        messages = 0
        if stream_bytes is not None and self.data_bytes != self.streams * stream_bytes:
            problems.append(f"{self.data_bytes} bytes, expected {self.streams} x {stream_bytes}")
        if payload is not None:
            framing = self.data_bytes - self.streams * payload
            messages = framing // 5
            if framing % 5 or not self.streams <= messages:
                problems.append(
                    f"{self.data_bytes} bytes: not {self.streams} x {payload} in 5-byte-prefixed messages"
                )
        if problems:
            raise RuntimeError("h2load streams: " + "; ".join(problems))
        return messages


class Streams:
    """``with Streams(address, method, request, connections, per_connection) as streams:`` h2load
    opens connections x per_connection calls at once; `streams.finish()` waits for all to end."""

    def __init__(self, address: str, method: str, request: bytes, connections: int, per_connection: int):
        self.streams = connections * per_connection
        self.connections = connections
        self._body = tempfile.NamedTemporaryFile(prefix="spindle-h2streams-", suffix=".grpc")  # noqa: SIM115
        self._body.write(h2load.grpc_frame(request))
        self._body.flush()
        command = [
            h2load.H2LOAD,
            f"--clients={connections}",
            f"--max-concurrent-streams={per_connection}",
            f"--requests={self.streams}",
            f"--window-bits={WINDOW_BITS}",
            f"--connection-window-bits={WINDOW_BITS}",
            f"--data={Path(self._body.name)}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"http://{address}{method}",
        ]
        self._process: subprocess.Popen[str] | None = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def __enter__(self) -> Streams:
        return self

    def __exit__(self, *_: object) -> None:
        if self._process is not None:  # not finished: the block failed
            self._process.kill()
            self._process.communicate()
            self._process = None
        self._body.close()

    def finish(self, timeout: float = 600.0) -> Drained:
        assert self._process is not None
        out, err = self._process.communicate(timeout=timeout)
        code = self._process.returncode
        self._process = None
        self._body.close()
        if code != 0:
            raise RuntimeError(f"h2load failed ({code}): {err or out}")
        window = h2load.parse(out)
        found = _TIME.search(out)
        assert found is not None
        seconds = float(found.group(1)) / (1000 if found.group(2) == "ms" else 1)
        return Drained(self.streams, self.connections, seconds, window.data_bytes, window)


def drain(address: str, method: str, request: bytes, connections: int, per_connection: int) -> Drained:
    """Opens the streams at once and reads them all to their end."""
    with Streams(address, method, request, connections, per_connection) as streams:
        return streams.finish()


def _metrics(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
        text: str = response.read().decode()
    return text


def listen_streams(metrics_port: int) -> int:
    """Spindle's Listen and ListenBatches streams open now (spindle_listen_streams)."""
    found = re.search(r"^spindle_listen_streams (\S+)$", _metrics(metrics_port), re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def calls_by_code(metrics_port: int, method: str) -> dict[str, int]:
    """Spindle's own count of `method`'s calls by status code (spindle_rpcs_total)."""
    counts: dict[str, int] = {}
    text = _metrics(metrics_port)
    for labels, value in re.findall(r"^spindle_rpcs_total\{(.*)\} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("method") == method:
            counts[found["code"]] = int(float(value))
    return counts
