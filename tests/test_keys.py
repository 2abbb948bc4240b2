"""API keys from a file (--api-keys-file): projects, `spindle-server keys`, reload on SIGHUP, and no
key ever in the server's output."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from spindle.v1 import common_pb2, run_pb2
from spindle_server import keys
from spindle_server.api.errors import ApiError
from spindle_server.api.interceptor import ApiKeys
from support.server import ServerProcess
from support.stubs import Stubs, error_details

KEY_SHAPE = re.compile(r"sk-spindle-[A-Za-z0-9_-]{43}")
WRONG_KEY = "sk-spindle-wrongwrongwrongwrongwrongwrongwrongwro"
RELOAD_EVENTS = ("api_keys_reloaded", "api_keys_reload_failed")


def keys_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spindle_server", "keys", *args], capture_output=True, text=True, timeout=60
    )


def add_key(path: Path, project: str) -> str:
    added = keys_command("add", "--project", project, "--file", str(path))
    assert added.returncode == 0, added.stderr
    assert KEY_SHAPE.fullmatch(added.stdout.strip()) and added.stdout.count("\n") == 1  # the key only
    return added.stdout.strip()


def hash_prefix(key: str) -> str:
    return keys.digest(key).hex()[:12]


def reload(server: ServerProcess) -> dict[str, object]:
    """SIGHUP, then the server's log line about that reload (a bound on waiting, not a delay)."""
    assert server.process is not None
    before = sum(e.get("event") in RELOAD_EVENTS for e in server.log_events())
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reloads = [e for e in server.log_events() if e.get("event") in RELOAD_EVENTS]
        if len(reloads) > before:
            return reloads[before]
        time.sleep(0.02)
    raise AssertionError("the server logged no reload")


def refusal(stubs: Stubs) -> str:
    """The ErrorInfo reason of a call that must be refused as UNAUTHENTICATED."""
    with pytest.raises(grpc.RpcError) as refused:
        stubs.runs.List(run_pb2.ListRunsRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info, _ = error_details(refused.value)
    assert info is not None
    return info.reason


def assert_no_key_logged(server: ServerProcess, *secrets: str) -> None:
    output = "".join(server.stderr_lines)
    assert output  # debug level: every call was logged
    for secret in secrets:
        assert secret not in output
        assert keys.digest(secret).hex() not in output  # nor the hashes


def test_keys_file_gives_each_project_its_own_resources(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = tmp_path / "keys"
    alpha_key, beta_key = add_key(path, "alpha"), add_key(path, "beta")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert alpha_key not in path.read_text() and keys.digest(alpha_key).hex() in path.read_text()
    server = make_server("--api-keys-file", str(path), "--log-level", "debug")
    alpha, beta = Stubs.connect(server.address, alpha_key), Stubs.connect(server.address, beta_key)
    wrong, anonymous = Stubs.connect(server.address, WRONG_KEY), Stubs.connect(server.address)
    try:
        run = alpha.start("for alpha only")
        assert alpha.wait(run.id).status == run_pb2.COMPLETED
        with pytest.raises(grpc.RpcError) as hidden:
            beta.runs.Get(run_pb2.GetRunRequest(run_id=run.id), timeout=10)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        assert list(beta.runs.List(run_pb2.ListRunsRequest(), timeout=10).runs) == []
        assert [r.id for r in alpha.runs.List(run_pb2.ListRunsRequest(), timeout=10).runs] == [run.id]
        assert refusal(wrong) == "INVALID_API_KEY"
        assert refusal(anonymous) == "MISSING_API_KEY"
    finally:
        for stubs in (alpha, beta, wrong, anonymous):
            stubs.close()
    assert_no_key_logged(server, alpha_key, beta_key, WRONG_KEY)


def test_added_and_removed_keys_apply_on_sighup_without_restart(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = tmp_path / "keys"
    first = add_key(path, "alpha")
    server = make_server("--api-keys-file", str(path), "--log-level", "debug")
    assert server.process is not None
    pid = server.process.pid
    old, new = Stubs.connect(server.address, first), None
    try:
        second = add_key(path, "alpha")
        new = Stubs.connect(server.address, second)
        assert refusal(new) == "INVALID_API_KEY"  # written to the file, not loaded yet
        loaded = reload(server)
        assert (loaded["event"], loaded["keys"], loaded["projects"]) == ("api_keys_reloaded", 2, 1)
        assert new.runs.List(run_pb2.ListRunsRequest(), timeout=10) is not None

        # A Listen opened with the first key outlives that key's removal.
        assistant = old.tool_assistant("lookup")
        run = old.run(assistant.id, old.thread("/tool lookup {}").id)
        paused = old.wait(run.id)
        assert paused.status == run_pb2.TOOL_CALLS
        stream = old.runs.Listen(run_pb2.ListenRunRequest(run_id=run.id), timeout=60)
        received = [next(stream)]  # the call is authenticated and open

        removed = keys_command("remove", hash_prefix(first), "--file", str(path))
        assert removed.returncode == 0, removed.stderr
        assert reload(server)["keys"] == 1
        assert refusal(old) == "INVALID_API_KEY"
        new.runs.SubmitToolResults(
            run_pb2.SubmitToolResultsRequest(
                run_id=run.id,
                tool_results=[
                    common_pb2.ToolResult(tool_call_id=paused.required_tool_calls[0].id, output="1")
                ],
            ),
            timeout=10,
        )
        received.extend(stream)
        assert received[-1].HasField("done")
        assert new.runs.Get(run_pb2.GetRunRequest(run_id=run.id), timeout=10).status == run_pb2.COMPLETED
        assert server.process.pid == pid and server.process.poll() is None
    finally:
        old.close()
        if new is not None:
            new.close()
    assert_no_key_logged(server, first, second)


def test_a_malformed_file_at_reload_keeps_the_keys_in_use(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = tmp_path / "keys"
    key = add_key(path, "alpha")
    server = make_server("--api-keys-file", str(path), "--log-level", "debug")
    stubs = Stubs.connect(server.address, key)
    pasted = "sk-spindle-pasted-here-by-mistake"
    try:
        good = path.read_text()
        path.write_text(good + f"# a comment\n\n{pasted} beta\n")
        failed = reload(server)
        assert failed["event"] == "api_keys_reload_failed" and failed["keys_kept"] == 1
        assert "line 4" in str(failed["error"])
        stubs.runs.List(run_pb2.ListRunsRequest(), timeout=10)  # the old key still works
        path.write_text(good)
        replacement = add_key(path, "beta")
        assert reload(server)["event"] == "api_keys_reloaded"
        beta = Stubs.connect(server.address, replacement)
        try:
            beta.runs.List(run_pb2.ListRunsRequest(), timeout=10)
        finally:
            beta.close()
    finally:
        stubs.close()
    assert_no_key_logged(server, key, pasted, replacement)


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("# keys\n\nsha256:abc alpha\n", 3),
        ("sk-spindle-pasted-by-mistake alpha\n", 1),
        (f"sha256:{'a' * 64} alpha\nsha256:{'b' * 64}\n", 2),
        (f"sha256:{'a' * 64} al/pha\n", 1),
        (f"sha256:{'a' * 64} alpha\nsha256:{'a' * 64} beta\n", 2),
        (f"md5:{'a' * 32} alpha\n", 1),
    ],
)
def test_a_malformed_file_at_start_is_a_one_line_error(tmp_path: Path, content: str, line: int) -> None:
    path = tmp_path / "keys"
    path.write_text(content)
    started = subprocess.run(
        [sys.executable, "-m", "spindle_server", "--port", "0", "--database", str(tmp_path / "db"),
         "--api-keys-file", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 1
    assert started.stdout == ""
    lines = started.stderr.splitlines()
    assert len(lines) == 1 and f"line {line}:" in lines[0], started.stderr
    assert "pasted" not in started.stderr  # the line itself is never echoed


def test_a_missing_file_at_start_is_a_one_line_error(tmp_path: Path) -> None:
    started = subprocess.run(
        [sys.executable, "-m", "spindle_server", "--port", "0", "--database", str(tmp_path / "db"),
         "--api-keys-file", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert started.returncode == 1
    assert started.stderr.splitlines() == [
        f"spindle-server: cannot read the API keys file {tmp_path / 'nowhere'}: no such file"
    ]


def test_keys_command_adds_lists_and_removes(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "keys"
    path.parent.mkdir()
    first, second = add_key(path, "alpha"), add_key(path, "beta")
    assert first != second
    listed = keys_command("list", "--file", str(path))
    assert listed.returncode == 0
    assert listed.stdout.splitlines() == [
        f"sha256:{hash_prefix(first)}  alpha",
        f"sha256:{hash_prefix(second)}  beta",
    ]
    for refused in (
        keys_command("remove", "0" * 8, "--file", str(path)),  # no such key
        keys_command("remove", "abc", "--file", str(path)),  # too short to be sure
        keys_command("add", "--project", "two words", "--file", str(path)),
    ):
        assert refused.returncode == 1 and refused.stdout == "" and refused.stderr.count("\n") == 1
    removed = keys_command("remove", f"sha256:{hash_prefix(first)}", "--file", str(path))
    assert removed.returncode == 0 and removed.stdout == ""
    assert [e.project for e in keys.load(path)] == ["beta"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the rewrite keeps the mode
    # Appending to a file the server would refuse helps nobody.
    path.write_text("not a key line\n")
    broken = keys_command("add", "--project", "alpha", "--file", str(path))
    assert broken.returncode == 1 and broken.stdout == "" and "line 1" in broken.stderr
    assert path.read_text() == "not a key line\n"
    # The file can also come from the environment; no subcommand is a usage error.
    env = {**os.environ, "SPINDLE_API_KEYS_FILE": str(tmp_path / "other")}
    from_env = subprocess.run(
        [sys.executable, "-m", "spindle_server", "keys", "add", "--project", "gamma"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert from_env.returncode == 0 and keys.load(tmp_path / "other")[0].project == "gamma"
    assert keys_command().returncode == 2


def test_an_empty_keys_file_admits_no_one() -> None:
    """A keys file with every key removed must not fall back to 'no keys, everyone is default'."""
    api_keys = ApiKeys({}, required=True)
    api_keys.replace(keys.parse("# all keys removed\n", "keys"))
    with pytest.raises(ApiError) as refused:
        api_keys.project_for({"authorization": f"Bearer {WRONG_KEY}"})
    assert refused.value.reason == "INVALID_API_KEY"
    assert ApiKeys({}).project_for({}) == "default"  # no keys configured at all: open, as before


def test_command_line_keys_stay_through_reloads() -> None:
    api_keys = ApiKeys({"local-key": "dev"}, required=True)
    entry = keys.KeyEntry(keys.digest("file-key"), "alpha", 1)
    api_keys.replace([entry])
    assert api_keys.project_for({"authorization": "Bearer file-key"}) == "alpha"
    api_keys.replace([])
    assert api_keys.project_for({"authorization": "Bearer local-key"}) == "dev"
    with pytest.raises(ApiError):
        api_keys.project_for({"authorization": "Bearer file-key"})


@pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.2 is a loopback address on Linux")
def test_a_command_line_key_beyond_localhost_is_warned_about(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "spindle_server", "--host", "127.0.0.2", "--port", "0",
         "--database", str(tmp_path / "db"), "--log-format", "json", "--api-key", "local-secret=dev"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert '"serving"' in server.stdout.readline()
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    assert '"api_keys_on_command_line"' in stderr
    assert "local-secret" not in stderr
