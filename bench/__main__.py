"""`python -m bench` (or `make bench`): run the benchmarks and update their sections of
BENCHMARKS.md. `python -m bench NAME...` runs only those (wait-latency, rpc-speed,
listen-fanout, load,
store-throughput, replicas). `python -m bench --smoke` (`make bench-smoke`) runs each one small and
writes nothing: it only proves they still work."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import _mode, fanout, load, replicas, rpc, store_throughput, wait_latency
from bench._report import update_section, wait_latency_section
from bench._server import BenchServer

ROOT = Path(__file__).resolve().parent.parent
MACHINE = f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def _wait_latency(when: str, started: float) -> str:
    with BenchServer() as server:
        print(
            f"wait latency: {wait_latency.samples()} runs per method, {wait_latency.push_samples()} more"
            f" for the pushed ones, on {server.address}",
            flush=True,
        )
        rows = wait_latency.measure(server.address)
    return wait_latency_section(rows, MACHINE, when, time.monotonic() - started)


def _rpc_speed(when: str, started: float) -> str:
    print("rpc speed (h2load and client processes) against a bare grpc.aio echo server", flush=True)
    rows = rpc.run_benchmark()
    return rpc.section(rows, when, time.monotonic() - started)


def _listen_fanout(when: str, started: float) -> str:
    print("listen fan-out against a bare grpc.aio stream", flush=True)
    figures = fanout.run_benchmark()
    return fanout.section(figures, MACHINE, when, time.monotonic() - started)


def _load(when: str, started: float) -> str:
    shape = load.bench_shape()
    print(f"load: {load.waves()} waves of {shape.runs_per_wave} concurrent runs", flush=True)
    figures = load.run_benchmark(shape)
    return load.section(figures, shape, MACHINE, when, time.monotonic() - started)


def _store_throughput(when: str, started: float) -> str:
    print("events persisted on SQLite, and what a whole run asks of the store", flush=True)
    figures = store_throughput.run_benchmark()
    return store_throughput.section(figures, MACHINE, when, time.monotonic() - started)


def _replicas(when: str, started: float) -> str | None:
    figures = replicas.run_benchmark()
    if figures is None:
        return None  # no PostgreSQL here: it said so, and its section stays as it was
    return replicas.section(figures, MACHINE, when, time.monotonic() - started)


BENCHMARKS: dict[str, Callable[[str, float], str | None]] = {
    "wait-latency": _wait_latency,
    "rpc-speed": _rpc_speed,
    "listen-fanout": _listen_fanout,
    "load": _load,
    "store-throughput": _store_throughput,
    "replicas": _replicas,
}


def main(names: list[str]) -> int:
    if "--smoke" in names:
        names = [name for name in names if name != "--smoke"]
        _mode.SMOKE = True
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    for name in names or list(BENCHMARKS):
        section = BENCHMARKS[name](when, time.monotonic())
        if section is None:
            continue
        if not _mode.SMOKE:
            update_section(ROOT / "BENCHMARKS.md", name, section)
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
