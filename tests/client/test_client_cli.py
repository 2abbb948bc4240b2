"""The `spindle` command line, in-process through `main()` and once as the installed script."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from spindle.cli import main
from support.server import ServerProcess

TIMEOUT = 60


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(server: ServerProcess) -> Callable[..., Outcome]:
    def run(*argv: str) -> Outcome:
        out, err = io.StringIO(), io.StringIO()
        code = main(["--target", server.address, *argv], stdout=out, stderr=err)
        return Outcome(code, out.getvalue(), err.getvalue())

    return run


def test_resources_from_the_command_line(cli: Callable[..., Outcome]) -> None:
    assistant = cli(
        "--json", "assistants", "create", "--name", "cli", "--tool", "get_weather", "--label", "a=b"
    )
    assert assistant.code == 0
    body = assistant.json()
    assert (
        body["name"] == "cli" and body["tools"][0]["name"] == "get_weather" and body["labels"] == {"a": "b"}
    )
    assert cli("assistants", "get", body["id"]).out.startswith(body["id"] + "\tcli")
    assert body["id"] in cli("assistants", "list", "--limit", "50").out
    thread = cli("threads", "create", "--message", "hello cli", "--json").json()
    assert cli("threads", "get", thread["id"]).code == 0
    assert thread["id"] in cli("threads", "list", "--limit", "50").out
    message = cli("messages", "create", thread["id"], "second", "--json").json()
    assert message["text"] == "second" and message["role"] == "USER"
    listed = cli("--json", "messages", "list", thread["id"], "--order", "asc").json()
    assert [m["text"] for m in listed] == ["hello cli", "second"]
    assert cli("messages", "get", message["id"]).out.startswith(message["id"])
    run = cli("runs", "create", "--thread", thread["id"], "--assistant", body["id"], "--wait", "--json")
    assert run.code == 0 and run.json()["status"] == "COMPLETED" and run.json()["text"] == "You said: second"
    runs = cli("--json", "runs", "list", "--thread", thread["id"], "--status", "completed").json()
    assert len(runs) == 1 and runs[0]["status"] == "COMPLETED"
    assert cli("runs", "get", runs[0]["id"]).out.split("\t")[1] == "COMPLETED"
    assert "message_creation" in cli("runs", "steps", runs[0]["id"]).out


def test_chat_streams_the_reply(cli: Callable[..., Outcome]) -> None:
    chat = cli("chat", "/sleep 0.3\nstream this please")
    assert chat.code == 0
    assert chat.out == "You said: /sleep 0.3\nstream this please\n"
    assert "thread thread_" in chat.err  # how to continue, on stderr, not mixed into the reply
    thread_id = chat.err.split()[1]
    follow_up = cli("chat", "and this", "--thread", thread_id)
    assert follow_up.code == 0 and follow_up.out == "You said: and this\n"
    events = [json.loads(line) for line in cli("--json", "chat", "json events").out.splitlines()]
    assert [e["index"] for e in events] == list(range(len(events))) and events[-1]["type"] == "DONE"


def test_exit_codes_tell_outcomes_apart(cli: Callable[..., Outcome]) -> None:
    assert cli("chat", "/fail broken on purpose").code == 1
    paused = cli("chat", '/tool get_weather {"city": "Oslo"}', "--assistant", tool_assistant(cli))
    assert paused.code == 5 and "get_weather" in paused.out and "spindle submit" in paused.err
    call_id = paused.out.split("\t")[0]
    run_id = next(word for word in paused.err.split() if word.startswith("run_"))
    submitted = cli("submit", run_id, "--output", f"{call_id}=cold", "--wait")
    assert submitted.code == 0 and submitted.out == "Tool results: get_weather returned cold\n"
    assert cli("wait", run_id).code == 0
    assert cli("runs", "get", "run_doesnotexist").code == 3
    invalid = cli("runs", "list", "--thread", "not-a-thread-id")
    assert invalid.code == 3 and "thread_id" in invalid.err
    assert cli("no-such-command").code == 2
    assert cli("submit", run_id, "--output", "missing-equals").code == 2


def tool_assistant(cli: Callable[..., Outcome]) -> str:
    return str(cli("--json", "assistants", "create", "--tool", "get_weather").json()["id"])


def test_wait_timeout_listen_and_cancel(cli: Callable[..., Outcome]) -> None:
    thread = cli("--json", "threads", "create", "--message", "/sleep 5\nslow").json()["id"]
    assistant = cli("--json", "assistants", "create").json()["id"]
    run_id = cli("--json", "runs", "create", "--thread", thread, "--assistant", assistant).json()["id"]
    timed_out = cli("wait", run_id, "--timeout", "0.3")
    assert timed_out.code == 4 and "the run goes on" in timed_out.err
    assert timed_out.err.count("\r") == 0  # no spinner when stderr is not a terminal
    assert cli("cancel", run_id).code == 0
    assert cli("wait", run_id).code == 1
    lines = [json.loads(line) for line in cli("--json", "listen", run_id, "--from", "1").out.splitlines()]
    assert lines[0]["index"] == 1 and lines[-1]["is_terminal"] and lines[-1]["status"] == "CANCELLED"


def test_target_and_api_key_from_the_environment(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server("--api-key", "k3y=cli-team")
    env = {**os.environ, "SPINDLE_TARGET": server.address}
    command = [sys.executable, "-m", "spindle.cli", "--json", "threads", "create"]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert refused.returncode == 3 and "UNAUTHENTICATED" in refused.stderr
    allowed = subprocess.run(
        command, env={**env, "SPINDLE_API_KEY": "k3y"}, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["created_by"] == "cli-team"
    flag = subprocess.run(
        [*command[:3], "--api-key", "k3y", *command[3:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert flag.returncode == 0


def test_the_installed_spindle_script_streams_a_chat(server: ServerProcess) -> None:
    script = shutil.which("spindle", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the console script is not installed (pip install -e . creates it)")
    env = {**os.environ, "SPINDLE_TARGET": server.address}
    done = subprocess.run(
        [script, "chat", "hi from a shell"], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0 and done.stdout == "You said: hi from a shell\n"


def test_bad_global_options_are_usage_errors_not_tracebacks(
    cli: Callable[..., Outcome], tmp_path: Any
) -> None:
    """Exit 1 means "the run failed": a bad option must not crash with a traceback and exit 1."""
    for argv in (
        ("--rpc-timeout", "0", "threads", "list"),
        ("--ca-file", str(tmp_path / "missing.pem"), "threads", "list"),
    ):
        outcome = cli(*argv)
        assert outcome.code == 2 and outcome.err.startswith("error: "), (argv, outcome)


def test_listen_tells_how_the_run_ended_even_from_past_its_end(cli: Callable[..., Outcome]) -> None:
    thread = cli("--json", "threads", "create", "--message", "/fail listened late").json()["id"]
    assistant = cli("--json", "assistants", "create").json()["id"]
    run_id = cli("--json", "runs", "create", "--thread", thread, "--assistant", assistant).json()["id"]
    assert cli("wait", run_id).code == 1
    assert cli("listen", run_id).code == 1
    late = cli("listen", run_id, "--from", "999")  # nothing left to print; the run still FAILED
    assert late.out == "" and late.code == 1


def _closed_pipe_run(server: ServerProcess, *argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI with stdout into a pipe whose reader has already gone (`| head` that quit)."""
    reader, writer = os.pipe()
    os.close(reader)  # before the CLI writes: its first write meets EPIPE, every time
    try:
        return subprocess.run(
            [sys.executable, "-m", "spindle.cli", "--target", server.address, *argv],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        os.close(writer)


@pytest.mark.parametrize(
    "argv",
    [("assistants", "list"), ("--json", "assistants", "list"), ("chat", "hello pipe")],
    ids=["list", "json-list", "chat"],
)
def test_a_closed_pipe_ends_the_cli_quietly(
    cli: Callable[..., Outcome], server: ServerProcess, argv: tuple[str, ...]
) -> None:
    assert cli("assistants", "create", "--name", "piped").code == 0  # something to list

    done = _closed_pipe_run(server, *argv)

    assert done.returncode == 141, done.stderr  # 128 + SIGPIPE, as `yes | head` ends
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
    assert "Exception ignored" not in done.stderr  # nothing left to flush at exit either


def test_chat_without_an_assistant_reuses_one(cli: Callable[..., Outcome]) -> None:
    def chat_assistants() -> list[dict[str, Any]]:
        listed = cli("--json", "assistants", "list", "--order", "asc").json()
        return [a for a in listed if a["labels"].get("spindle-cli") == "chat"]

    before = chat_assistants()
    first = cli("chat", "first")
    second = cli("--json", "chat", "second")

    assert first.code == 0 and second.code == 0
    after = chat_assistants()
    assert len(after) == max(len(before), 1) and after[0]["name"] == "spindle-chat"
    run_id = json.loads(second.out.splitlines()[0])["run_id"]
    assert cli("--json", "runs", "get", run_id).json()["assistant_id"] == after[0]["id"]  # the oldest
