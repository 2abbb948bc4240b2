"""RPC speed of the Spindle server, as ratios against a bare grpc.aio echo server (uvloop) measured
in the same run (the machines are shared and noisy: absolute numbers mean little, ratios travel).

Unary rows: h2load (bench/h2load.py) drives the same load shape at Spindle and at the echo server
in turns, window by window; each figure is the median of the windows. Every window is verified
(h2load counts any HTTP 200, gRPC errors included): the DATA bytes must be whole responses, and
Spindle's own metrics must count no call of the method with any status but OK.

The whole-run row needs a streaming Listen, which h2load cannot follow: several Python client
processes (bench/rpc_client.py) run thread + Create + Listen to DONE in loops for the same
window, and the figure is compared with the echo's calls/s at the same number in flight.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import grpc

from bench import _mode, h2load
from bench._server import BenchServer, ServedProcess, echo_server
from spindle.v1 import (
    assistant_pb2,
    assistant_pb2_grpc,
    message_pb2,
    run_pb2,
    run_pb2_grpc,
    thread_pb2,
    thread_pb2_grpc,
)

ECHO = "/bench.Echo/Echo"
GET = "/spindle.v1.RunService/Get"
CREATE_MESSAGE = "/spindle.v1.MessageService/Create"
# Spindle as an operator runs it: access log at info (errors and slow calls), metrics served.
SERVER_FLAGS = ("--log-level", "info", "--metrics-port", "0")
CLIENT_PROCESSES = 4
CLIENT_CONCURRENCY = 4  # whole runs in flight in each client process


def windows() -> int:
    return _mode.sized(5, 1)


def window_seconds() -> float:
    return _mode.seconds(3.0, 0.5)


def read_load() -> h2load.Load:
    return h2load.Load(connections=1, streams=16, seconds=window_seconds())


def create_loads() -> tuple[h2load.Load, ...]:
    return (
        h2load.Load(connections=1, streams=16, seconds=window_seconds()),
        h2load.Load(connections=4, streams=64, seconds=window_seconds()),
    )


@dataclass(frozen=True)
class Row:
    name: str
    load: str
    per_second: float
    baseline: float
    windows: list[float]

    @property
    def ratio(self) -> float:
        return self.per_second / self.baseline if self.baseline else 0.0


@dataclass(frozen=True)
class Fixture:
    """What the load calls on: a finished run to read, a thread to write to, an assistant."""

    assistant_id: str
    run_id: str
    thread_id: str
    get_request: bytes
    get_response_frame: int
    create_request: bytes
    echo_request: bytes


def prepare(address: str, echo_address: str) -> Fixture:
    """Creates what the load needs with a real gRPC client, and makes one call of each loaded
    method with the exact bytes h2load will send: the answers must be OK, and give the size of
    a framed response for the windows' check."""
    with grpc.insecure_channel(address) as channel:
        assistant = assistant_pb2_grpc.AssistantServiceStub(channel).Create(
            assistant_pb2.CreateAssistantRequest(name="bench")
        )
        threads = thread_pb2_grpc.ThreadServiceStub(channel)
        runs = run_pb2_grpc.RunServiceStub(channel)
        thread = threads.Create(
            thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text="hi")])
        )
        run = runs.Create(run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id))
        runs.Wait(run_pb2.WaitRunRequest(run_id=run.id))
        notes = threads.Create(thread_pb2.CreateThreadRequest())
        get_request = run_pb2.GetRunRequest(run_id=run.id).SerializeToString()
        create_request = message_pb2.CreateMessageRequest(thread_id=notes.id, text="note").SerializeToString()
        got = channel.unary_unary(GET)(get_request)
        run_pb2.Run.FromString(got)
        message_pb2.Message.FromString(channel.unary_unary(CREATE_MESSAGE)(create_request))
    echo_request = get_request  # the same bytes in, and back
    with grpc.insecure_channel(echo_address) as channel:
        assert channel.unary_unary(ECHO)(echo_request) == echo_request
    return Fixture(
        assistant.id, run.id, notes.id, get_request, len(h2load.grpc_frame(got)), create_request, echo_request
    )


def rpc_counts(metrics_port: int, method: str) -> dict[str, float]:
    """Spindle's own count of `method`'s calls by status code (spindle_rpcs_total)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    pattern = re.compile(r'^spindle_rpcs_total\{(.*)\} (\S+)$')
    for line in text.splitlines():
        found = pattern.match(line)
        if found is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if labels.get("method") == method:
            counts[labels["code"]] = float(found.group(2))
    return counts


class Turns:
    """The measured figures, each a list of windows' rates, filled in turn by turn."""

    def __init__(self) -> None:
        self.windows: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.windows.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.windows[key])


def _spindle_window(
    address: str, metrics_port: int, method: str, request: bytes, load: h2load.Load, frame: int | None = None
) -> float:
    """One checked h2load window on Spindle: its calls/s. With `frame` (the size of every framed
    response, when all are alike), the DATA bytes are checked too."""
    before = rpc_counts(metrics_port, method)
    window = h2load.run(address, method, request, load)
    if frame is not None:
        window.check(frame)
    after = rpc_counts(metrics_port, method)
    errors = {code: after[code] - before.get(code, 0) for code in after if code != "OK"}
    # h2load resets the streams still in flight when its time is up: the server counts those
    # CANCELLED (the client went away), never more than were in flight.
    if errors.get("CANCELLED", 0) <= load.in_flight:
        errors.pop("CANCELLED", None)
    if any(errors.values()):
        raise RuntimeError(f"{method} answered errors under load: {errors}")
    answered = after.get("OK", 0) - before.get("OK", 0)
    if answered < window.succeeded:
        raise RuntimeError(f"{method}: h2load counted {window.succeeded} calls, the server {answered}")
    if window.failed or window.errored or window.succeeded == 0:
        raise RuntimeError(f"{method}: {window}")
    return window.per_second


def _echo_window(address: str, request: bytes, load: h2load.Load) -> float:
    window = h2load.run(address, ECHO, request, load)
    window.check(len(h2load.grpc_frame(request)))
    return window.per_second


def _whole_runs_window(address: str, assistant_id: str, seconds: float) -> float:
    """Whole runs/s from CLIENT_PROCESSES client processes started together."""
    start_at = time.time() + 1.5  # each process imports grpc first; they then start at once
    command = [sys.executable, "-m", "bench.rpc_client", address, assistant_id]
    arguments = [str(start_at), str(seconds), str(CLIENT_CONCURRENCY)]
    processes = [
        subprocess.Popen([*command, *arguments], stdout=subprocess.PIPE, text=True)
        for _ in range(CLIENT_PROCESSES)
    ]
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 120)
        if process.returncode != 0:
            raise RuntimeError(f"bench.rpc_client failed ({process.returncode})")
        results.append(json.loads(out))
    return sum(r["runs"] for r in results) / max(r["seconds"] for r in results)


def measure(spindle: ServedProcess, echo: ServedProcess) -> list[Row]:
    metrics_port = int(spindle.serving["metrics_port"])
    fixture = prepare(spindle.address, echo.address)
    get_load = read_load()
    loads = create_loads()
    whole_in_flight = CLIENT_PROCESSES * CLIENT_CONCURRENCY
    echo_loads = {get_load, *loads}
    turns = Turns()
    warm = h2load.Load(1, 16, _mode.seconds(1.0, 0.2))
    _echo_window(echo.address, fixture.echo_request, warm)
    _spindle_window(spindle.address, metrics_port, GET, fixture.get_request, warm, fixture.get_response_frame)
    for _ in range(windows()):
        for load in sorted(echo_loads, key=lambda x: x.in_flight):
            turns.add(f"echo {load}", _echo_window(echo.address, fixture.echo_request, load))
            if load == get_load:
                rate = _spindle_window(
                    spindle.address, metrics_port, GET, fixture.get_request, load, fixture.get_response_frame
                )
                turns.add(f"get {load}", rate)
            if load in loads:
                rate = _spindle_window(
                    spindle.address, metrics_port, CREATE_MESSAGE, fixture.create_request, load
                )
                turns.add(f"create {load}", rate)
        turns.add("whole", _whole_runs_window(spindle.address, fixture.assistant_id, window_seconds()))
    rows = [_row(turns, "RunService.Get (read)", "get", get_load)]
    rows += [_row(turns, "MessageService.Create (durable write)", "create", load) for load in loads]
    echo_for_whole = next((x for x in echo_loads if x.in_flight == whole_in_flight), get_load)
    rows.append(
        Row(
            "whole run: thread + Create + Listen to DONE (runs/s vs echo calls/s)",
            f"{CLIENT_PROCESSES} Python client processes, {CLIENT_CONCURRENCY} runs in flight each",
            turns.median("whole"),
            turns.median(f"echo {echo_for_whole}"),
            turns.windows["whole"],
        )
    )
    return rows


def _row(turns: Turns, name: str, key: str, load: h2load.Load) -> Row:
    return Row(
        name,
        load.describe(),
        turns.median(f"{key} {load}"),
        turns.median(f"echo {load}"),
        turns.windows[f"{key} {load}"],
    )


def run_benchmark() -> list[Row]:
    with BenchServer(*SERVER_FLAGS) as spindle, echo_server() as echo:
        return measure(spindle, echo)


def markdown(rows: list[Row]) -> str:
    lines = [
        "| call | load | calls/s (median) | echo calls/s (median) | vs bare echo | windows (calls/s) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        spread = ", ".join(f"{value:,.0f}" for value in row.windows)
        figures = f"{row.per_second:,.0f} | {row.baseline:,.0f} | {row.ratio:.2f}"
        lines.append(f"| {row.name} | {row.load} | {figures} | {spread} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run_benchmark()))
