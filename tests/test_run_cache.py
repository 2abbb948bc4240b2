"""RunService.Get from memory (store/sqlite_cache.py) never answers an older run than the file
holds, and the SQLite file has one owner.

Real servers; the races are steered with fault points: the writer held between a batch's COMMIT
and the event loop learning of it (`sqlite.after_commit:METHOD`, reached by writes made with a
request_id), and a Get's read in the reader pool held after it read, before it fills the cache
(`store.get_run.after_pool_read`). Whether a Get was answered from memory is read from the
server's own count (spindle_store_run_cache_lookups).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spindle.v1 import common_pb2, run_pb2
from support.faults import Holds
from support.server import ServerProcess
from support.stubs import Stubs

MakeServer = Callable[..., ServerProcess]
AFTER_COMMIT = "sqlite.after_commit:runs.update"
POOL_READ = "store.get_run.after_pool_read"

pytestmark = pytest.mark.sqlite_only("the cache and the single owner are the SQLite store's")


def cache_hits(server: ServerProcess) -> float:
    port = server.serving["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "spindle_store_run_cache_lookups_total" and sample.labels == {"result": "hit"}:
                return sample.value
    return 0.0


def get(stubs: Stubs, run_id: str) -> run_pb2.Run:
    return stubs.runs.Get(run_pb2.GetRunRequest(run_id=run_id), timeout=10)


def get_from_memory(server: ServerProcess, stubs: Stubs, run_id: str) -> run_pb2.Run:
    """Gets the run until one Get is answered from the cache (the first fills it; any batch of
    the writer, the claim loop's idle poll included, empties it): the run as kept there."""
    for _ in range(50):
        before = cache_hits(server)
        run = get(stubs, run_id)
        if cache_hits(server) > before:
            return run
    raise AssertionError(f"no Get of {run_id} was answered from memory")


def relabel(stubs: Stubs, run_id: str, value: str, request_id: str = "") -> run_pb2.Run:
    request = run_pb2.UpdateRunRequest(run_id=run_id, labels={"v": value}, request_id=request_id)
    request.update_mask.paths.append("labels")
    return stubs.runs.Update(request, timeout=30)


def stored_labels(database: Path, run_id: str) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        (labels,) = connection.execute("SELECT labels FROM runs WHERE id = ?", (run_id,)).fetchone()
    return dict(json.loads(labels))


def test_a_get_between_a_commit_and_the_loop_learning_of_it_reads_the_new_run(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """The run is in memory; an Update commits and the writer is held before it tells anyone
    (its caller has no answer yet). The file already holds the new run, so a Get (as from a
    client that saw the commit elsewhere) must answer it, not the kept one."""
    holds = Holds(tmp_path / "holds")
    server = make_server("--metrics-port", "0", env=holds.env(AFTER_COMMIT))
    stubs = Stubs.connect(server.address)
    try:
        run = stubs.wait(stubs.start("hello").id)
        assert get_from_memory(server, stubs, run.id).labels == {}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            update = pool.submit(relabel, stubs, run.id, "new", "update-1")
            holds.wait_reached(AFTER_COMMIT)
            assert stored_labels(server.sqlite_path, run.id) == {"v": "new"}  # committed
            assert not update.done()  # and not answered: the loop has not learnt of it
            assert get(stubs, run.id).labels == {"v": "new"}
            holds.release(AFTER_COMMIT)
            assert update.result(timeout=30).labels == {"v": "new"}
        assert get(stubs, run.id).labels == {"v": "new"}
        assert get_from_memory(server, stubs, run.id).labels == {"v": "new"}
    finally:
        stubs.close()


def test_gets_from_memory_follow_every_change(make_server: MakeServer) -> None:
    """Before each change the run is answered from memory; the first Get after the change's
    answer (Update, SubmitToolResults, the run's end, Cancel) shows the change."""
    server = make_server("--metrics-port", "0", "--tool-timeout", "600")
    stubs = Stubs.connect(server.address)
    try:
        assistant = stubs.tool_assistant("get_weather")
        paused = stubs.wait(stubs.start('/tool get_weather {"city": "Paris"}', assistant).id)
        assert paused.status == run_pb2.TOOL_CALLS
        assert get_from_memory(server, stubs, paused.id) == paused

        updated = relabel(stubs, paused.id, "one")
        assert get(stubs, paused.id) == updated
        assert get_from_memory(server, stubs, paused.id).labels == {"v": "one"}

        (call,) = paused.required_tool_calls
        results = [common_pb2.ToolResult(tool_call_id=call.id, output='{"temp": 21}')]
        stubs.runs.SubmitToolResults(
            run_pb2.SubmitToolResultsRequest(run_id=paused.id, tool_results=results), timeout=30
        )
        assert get(stubs, paused.id).status != run_pb2.TOOL_CALLS
        done = stubs.wait(paused.id)
        assert done.status == run_pb2.COMPLETED
        assert get(stubs, paused.id) == done
        assert get_from_memory(server, stubs, paused.id) == done

        slow = stubs.start("/sleep 60 " + " ".join(["word"] * 50))
        running = stubs.wait_for(slow.id, {run_pb2.IN_PROGRESS})
        assert running.status == run_pb2.IN_PROGRESS
        stubs.runs.Cancel(run_pb2.CancelRunRequest(run_id=slow.id), timeout=30)
        assert get(stubs, slow.id).status in (run_pb2.CANCELLING, run_pb2.CANCELLED)
        cancelled = stubs.wait(slow.id)
        assert cancelled.status == run_pb2.CANCELLED
        assert get_from_memory(server, stubs, slow.id) == cancelled
    finally:
        stubs.close()


def test_a_pool_read_overtaken_by_a_write_keeps_nothing(make_server: MakeServer, tmp_path: Path) -> None:
    """A Get reads the run in the reader pool and is held before it fills the cache; an Update
    commits meanwhile. The held Get may answer what it read (it began before the Update), but
    must not keep it: the next Gets, from the file and then from memory, show the Update."""
    holds = Holds(tmp_path / "holds")
    server = make_server("--metrics-port", "0", env=holds.env(POOL_READ))
    for nth in range(2, 50):  # every Get's pool read passes but the first, held below
        holds.release(POOL_READ, nth)
    stubs = Stubs.connect(server.address)
    try:
        run = stubs.wait(stubs.start("hello").id)
        relabel(stubs, run.id, "before")  # a write: the run Wait kept is dropped
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(get, stubs, run.id)  # the test's first Get: the first arrival
            holds.wait_reached(POOL_READ)
            assert relabel(stubs, run.id, "after").labels == {"v": "after"}
            holds.release(POOL_READ)
            assert held.result(timeout=30).labels == {"v": "before"}
        assert get(stubs, run.id).labels == {"v": "after"}
        assert get_from_memory(server, stubs, run.id).labels == {"v": "after"}
    finally:
        stubs.close()


def spindle_on(database: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "spindle_server", "--port", "0", "--database", str(database)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_second_server_on_the_file_is_refused_until_the_first_has_exited(make_server: MakeServer) -> None:
    first = make_server()
    database = first.sqlite_path
    assert first.process is not None
    refused = spindle_on(database)
    assert refused.returncode == 1
    assert str(database) in refused.stderr
    assert f"owned by another running server (pid {first.process.pid})" in refused.stderr
    stubs = Stubs.connect(first.address)
    run = stubs.wait(stubs.start("hello").id)
    stubs.close()

    first.kill()  # kill -9: the kernel lets go of the lock with the process
    second = make_server(database=first.database)
    stubs = Stubs.connect(second.address)
    assert get(stubs, run.id) == run
    stubs.close()
    assert second.stop() == 0

    third = make_server(database=first.database)  # after a graceful exit too
    stubs = Stubs.connect(third.address)
    assert get(stubs, run.id) == run
    stubs.close()


def test_a_run_kept_for_its_project_is_not_answered_to_another(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """The cache's key is (run id, project): with the run kept for its own project, another
    project's Get of that id reads the file, scoped, and answers NOT_FOUND."""
    keys_file = tmp_path / "keys"

    def add_key(project: str) -> str:
        command = [sys.executable, "-m", "spindle_server", "keys", "add", "--project", project]
        added = subprocess.run(
            [*command, "--file", str(keys_file)], capture_output=True, text=True, timeout=60
        )
        assert added.returncode == 0, added.stderr
        return added.stdout.strip()

    alpha_key, beta_key = add_key("alpha"), add_key("beta")
    server = make_server("--metrics-port", "0", "--api-keys-file", str(keys_file))
    alpha, beta = Stubs.connect(server.address, alpha_key), Stubs.connect(server.address, beta_key)
    try:
        run = get_from_memory(server, alpha, alpha.wait(alpha.start("for alpha only").id).id)
        with pytest.raises(grpc.RpcError) as hidden:
            get(beta, run.id)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        assert get_from_memory(server, alpha, run.id) == run
    finally:
        alpha.close()
        beta.close()
