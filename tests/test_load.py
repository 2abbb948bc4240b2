"""Load (issue 8, must-exist 4): hundreds of concurrent runs on one real server, several
listeners each (one joining late from an index), plain replies, tool rounds and cancels at
seeded random points; every event every listener saw is checked against the final logs by the
invariant checker, and the server's memory stays flat from wave to wave.

The shape is bench/load.py's (`make bench` reports its figures in BENCHMARKS.md). Bounded in count
(waves of RUNS runs), loopback only; no timing is asserted, the timeouts are failure bounds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.load import Shape, drive
from spindle.v1 import run_pb2
from support.invariants import History, assert_invariants
from support.server import ServerProcess
from support.stubs import TERMINAL, Stubs

RUNS = 300
WAVES = 4  # one warm-up wave, then three of the same size
# Memory after three more waves of 300 runs (900 runs, 2,700 Listen streams, their threads,
# messages and events in SQLite) must stay within 24 MiB of what it was after the warm-up wave.
# Measured here: under 1 MiB of growth over five waves. The rest is headroom for what wobbles
# without leaking (the allocator's arenas, grpc's buffers, SQLite's page caches). What a leak
# would hold is larger: a finished run's cached log (tens of events, about 1 KiB each as Python
# objects), a listener's subscription, an idempotency task. 28 KiB per run or 9 KiB per stream
# left behind would exceed the bound; a few hundred bytes per run would not, and is not what
# this guards against.
RSS_GROWTH_BOUND_KIB = 24 * 1024
# A failure bound: a listener stops waiting for a run that has not ended by then (a whole wave
# takes a few seconds here), so a stuck run fails the invariants by name instead of the whole
# test timing out.
LISTEN_BOUND = 60.0


@pytest.mark.timeout(300)
async def test_waves_of_concurrent_runs_keep_every_invariant_and_flat_memory(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "spindle.db", ["--tool-timeout", "600"]).start()
    stubs = Stubs.connect(server.address)
    history = History()
    shape = Shape(runs_per_wave=RUNS)
    try:
        assert server.process is not None
        figures = await drive(server.address, server.process.pid, history, shape, WAVES, LISTEN_BOUND)
        run_ids = [run_id for wave in figures.waves for run_id in wave.run_ids]
        # After a wave with a stuck run the load stops: the checker names it and its status.
        finals = assert_invariants(stubs, run_ids, history, bound=120.0)
        assert len(set(run_ids)) == RUNS * WAVES
        statuses = {final.run.status for final in finals.values()}
        assert statuses <= TERMINAL, "every run of the load ends (tool rounds answered, cancels done)"
        # The load reached what it is meant to: completions, tool rounds and cancels.
        assert {run_pb2.COMPLETED, run_pb2.CANCELLED} <= statuses
        answered = [
            step
            for final in finals.values()
            for step in final.steps
            if step.type == run_pb2.RunStep.TOOL_CALLS and step.status == run_pb2.RunStep.COMPLETED
        ]
        assert answered, "tool rounds were answered"
        assert history.answers, "tool results were sent with request ids (some twice)"
        assert len(history.seen) == RUNS * WAVES * shape.listeners
        assert any(seen.start > 0 for seen in history.seen), "some listeners joined late, mid-log"
        growth = figures.rss_end_kib - figures.rss_warm_kib
        assert growth < RSS_GROWTH_BOUND_KIB, (
            f"server RSS grew {growth} KiB over {WAVES - 1} waves after the warm-up "
            f"({figures.rss_warm_kib} -> {figures.rss_end_kib} KiB)"
        )
    finally:
        stubs.close()
        server.stop()
