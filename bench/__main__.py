"""`python -m bench` (or `make bench`): run the benchmarks and update their section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import fanout, rpc, wait_latency
from bench._report import fanout_section, rpc_section, update_section, wait_latency_section
from bench._server import BenchServer

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    started = time.monotonic()
    with BenchServer() as server:
        print(f"wait latency: {wait_latency.SAMPLES} runs per method on {server.address}", flush=True)
        rows = wait_latency.measure(server.address)
    machine = f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    section = wait_latency_section(rows, machine, when, time.monotonic() - started)
    update_section(ROOT / "BENCHMARKS.md", "wait-latency", section)
    sys.stdout.write(section)

    started = time.monotonic()
    print("rpc speed against a bare grpc.aio echo server", flush=True)
    rows_rpc = rpc.run_benchmark()
    section = rpc_section(rpc.markdown(rows_rpc), machine, when, time.monotonic() - started)
    update_section(ROOT / "BENCHMARKS.md", "rpc-speed", section)
    sys.stdout.write(section)

    started = time.monotonic()
    print("listen fan-out against a bare grpc.aio stream", flush=True)
    section = fanout_section(
        fanout.markdown(fanout.run_benchmark()), machine, when, time.monotonic() - started
    )
    update_section(ROOT / "BENCHMARKS.md", "listen-fanout", section)
    sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
