"""Limits, against a real server started with small ones: exactly at each limit is accepted, one
over is refused with the right code and details (RESOURCE_EXHAUSTED + QuotaFailure, or
INVALID_ARGUMENT + the field), and a refused call changes nothing.

Each test works in a project of its own (one API key each), so the per-project counts of one
test never meet another's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2, status_pb2

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2
from spindle_server import clock
from spindle_server.config import parse_config
from spindle_server.limits import Limits
from spindle_server.store.errors import NotFoundError, QuotaError
from spindle_server.store.sqlite import SqliteStore
from support.server import Databases, ServerProcess, TestDatabase, count_rows
from support.stubs import Stubs, error_details

MAX_RUNS = 2
MAX_LISTENS = 2
MAX_TOOLS = 3
MAX_MESSAGE = 50
MAX_OUTPUT = 40
MAX_OUTPUTS_TOTAL = 60
PROJECTS = ("runs", "race", "listen", "listen2", "tools", "text", "outputs", "other")
# A failure bound for the server to notice a client's cancel, never a time a test relies on.
RELEASE_BOUND_SECONDS = 10.0


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, databases: Databases) -> Iterator[ServerProcess]:
    keys = [arg for project in PROJECTS for arg in ("--api-key", f"key-{project}={project}")]
    process = ServerProcess(
        databases.new(tmp_path_factory.mktemp("limits")),
        [
            *keys,
            "--max-active-runs-per-project",
            str(MAX_RUNS),
            "--max-listen-streams-per-project",
            str(MAX_LISTENS),
            "--max-tools",
            str(MAX_TOOLS),
            "--max-message-chars",
            str(MAX_MESSAGE),
            "--max-tool-output-chars",
            str(MAX_OUTPUT),
            "--max-tool-outputs-total-chars",
            str(MAX_OUTPUTS_TOTAL),
        ],
    ).start()
    yield process
    process.stop()


def connect(server: ServerProcess, project: str) -> Stubs:
    return Stubs.connect(server.address, api_key=f"key-{project}")


def quota_failure(error: grpc.RpcError) -> list[tuple[str, str]]:
    violations: list[tuple[str, str]] = []
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                    quota = error_details_pb2.QuotaFailure()
                    detail.Unpack(quota)
                    violations.extend((v.subject, v.description) for v in quota.violations)
    return violations


def assert_exhausted(error: grpc.RpcError, reason: str, project: str, limit: int) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    info, _ = error_details(error)
    assert info is not None and info.reason == reason and info.domain == "spindle.v1"
    assert info.metadata["limit"] == str(limit)
    ((subject, description),) = quota_failure(error)
    assert subject == f"projects/{project}" and f"at most {limit}" in description


def assert_invalid(error: grpc.RpcError, field: str) -> str:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    info, violations = error_details(error)
    assert info is not None and info.reason == "INVALID_ARGUMENT"
    fields = {f: d for f, d in violations}
    assert field in fields, violations
    return fields[field]


def tool_assistant(stubs: Stubs, *names: str) -> assistant_pb2.Assistant:
    request = assistant_pb2.CreateAssistantRequest(name="tools")
    for name in names:
        request.tools.add().function.name = name
    return stubs.assistants.Create(request, timeout=10)


def submit(stubs: Stubs, run_id: str, *outputs: str) -> run_pb2.Run:
    calls = stubs.wait(run_id).required_tool_calls
    results = [
        common_pb2.ToolResult(tool_call_id=c.id, output=o) for c, o in zip(calls, outputs, strict=True)
    ]
    return stubs.runs.SubmitToolResults(
        run_pb2.SubmitToolResultsRequest(run_id=run_id, tool_results=results), timeout=10
    )


def runs_of(stubs: Stubs, thread_id: str) -> list[run_pb2.Run]:
    return list(stubs.runs.List(run_pb2.ListRunsRequest(thread_id=thread_id), timeout=10).runs)


def messages_of(stubs: Stubs, thread_id: str) -> list[message_pb2.Message]:
    request = message_pb2.ListMessagesRequest(thread_id=thread_id, page_size=100)
    return list(stubs.messages.List(request, timeout=10).messages)


# ---- active runs per project ------------------------------------------------------------------


def test_active_runs_per_project(limited: ServerProcess) -> None:
    stubs, other = connect(limited, "runs"), connect(limited, "other")
    assistant = tool_assistant(stubs, "get_weather")
    threads = [stubs.thread("/tool get_weather {}") for _ in range(MAX_RUNS + 1)]
    # Runs waiting for tool results stay active until their results come.
    held = [stubs.run(assistant.id, t.id) for t in threads[:MAX_RUNS]]  # exactly at the limit
    for run in held:
        assert stubs.wait(run.id).status == run_pb2.TOOL_CALLS

    last = threads[-1]
    request = run_pb2.CreateRunRequest(
        assistant_id=assistant.id,
        thread_id=last.id,
        additional_messages=[message_pb2.MessageInput(text="one more")],
        request_id="third-run",
    )
    with pytest.raises(grpc.RpcError) as refused:
        stubs.runs.Create(request, timeout=10)
    assert_exhausted(refused.value, "ACTIVE_RUNS_LIMIT", "runs", MAX_RUNS)
    # Nothing of the refused call was written: no run, no additional message.
    assert runs_of(stubs, last.id) == []
    assert [m.content[0].text.text for m in messages_of(stubs, last.id)] == ["/tool get_weather {}"]

    # The limit is per project: another project is not affected.
    other_run = other.start("hello")
    assert other.wait(other_run.id).status == run_pb2.COMPLETED

    # A finished run frees its slot; the same request_id then goes through (the refusal was
    # not recorded as its answer).
    submit(stubs, held[0].id, "sunny")
    assert stubs.wait(held[0].id).status == run_pb2.COMPLETED
    created = stubs.runs.Create(request, timeout=10)
    assert created.status == run_pb2.PENDING
    assert stubs.runs.Create(request, timeout=10).id == created.id  # and is idempotent
    assert [r.id for r in runs_of(stubs, last.id)] == [created.id]
    other.close()
    stubs.close()


def test_active_runs_limit_holds_under_concurrent_creates(limited: ServerProcess) -> None:
    """Many creates at once: the count is taken in the inserting transaction, so exactly the
    limit's worth get in, whatever order the creates reach the store in."""
    stubs = connect(limited, "race")
    assistant = tool_assistant(stubs, "get_weather")
    threads = [stubs.thread("/tool get_weather {}") for _ in range(12)]

    def create(thread: thread_pb2.Thread) -> grpc.StatusCode:
        try:
            stubs.run(assistant.id, thread.id)
        except grpc.RpcError as error:
            assert_exhausted(error, "ACTIVE_RUNS_LIMIT", "race", MAX_RUNS)
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(max_workers=len(threads)) as pool:
        codes = list(pool.map(create, threads))
    assert codes.count(grpc.StatusCode.OK) == MAX_RUNS
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(threads) - MAX_RUNS
    listed = stubs.runs.List(run_pb2.ListRunsRequest(page_size=100), timeout=10).runs
    assert len(listed) == MAX_RUNS
    assert count_rows(limited.database, "runs", project="race") == MAX_RUNS
    stubs.close()


async def test_active_runs_limit_in_the_store(store: SqliteStore) -> None:
    for index in range(3):
        await store.insert_thread("p", thread_pb2.Thread(id=f"thread_{index}"), [])
    runs = [
        run_pb2.Run(id=f"run_{i}", thread_id=f"thread_{i}", assistant_id="a", status=run_pb2.PENDING)
        for i in range(3)
    ]
    for run in runs[:2]:
        await store.insert_run("p", run, [], clock.now() + 60, [], max_active_runs=2)
    with pytest.raises(QuotaError) as refused:
        await store.insert_run("p", runs[2], [], clock.now() + 60, [], max_active_runs=2)
    assert refused.value.reason == "ACTIVE_RUNS_LIMIT" and refused.value.limit == 2
    with pytest.raises(NotFoundError):
        await store.get_run("p", "run_2")
    await store.insert_run("p", runs[2], [], clock.now() + 60, [])  # no limit given: no count


# ---- Listen streams per project ---------------------------------------------------------------


def open_listen(stubs: Stubs, run_id: str) -> tuple[Any, run_pb2.StreamEvent]:
    """A Listen stream and its first event (which proves the server counted the stream)."""
    stream = stubs.runs.Listen(run_pb2.ListenRunRequest(run_id=run_id), timeout=60)
    return stream, next(stream)


def test_listen_streams_per_project(limited: ServerProcess) -> None:
    stubs, other = connect(limited, "listen"), connect(limited, "listen2")
    assistant = tool_assistant(stubs, "get_weather")
    run = stubs.run(assistant.id, stubs.thread("/tool get_weather {}").id)
    assert stubs.wait(run.id).status == run_pb2.TOOL_CALLS  # its streams stay open until it ends

    # A Listen refused for a missing run gives its slot back (the count is not left raised).
    for _ in range(MAX_LISTENS + 1):
        with pytest.raises(grpc.RpcError) as missing:
            list(stubs.runs.Listen(run_pb2.ListenRunRequest(run_id="run_missing"), timeout=10))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    streams = [open_listen(stubs, run.id)[0] for _ in range(MAX_LISTENS)]  # exactly at the limit
    with pytest.raises(grpc.RpcError) as refused:
        open_listen(stubs, run.id)
    assert_exhausted(refused.value, "LISTEN_STREAMS_LIMIT", "listen", MAX_LISTENS)

    # Another project's streams are counted apart.
    other_run = other.start("hi")
    assert other.events(other_run.id)[-1].status == run_pb2.COMPLETED

    # A client that goes away gives its slot back; the server learns of it a moment later.
    streams.pop().cancel()
    deadline = time.monotonic() + RELEASE_BOUND_SECONDS
    while True:
        try:
            streams.append(open_listen(stubs, run.id)[0])
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "a cancelled Listen kept its slot"
            time.sleep(0.05)

    # Streams that end with their run give their slots back before the client sees the end:
    # right after, the full allowance is open on another run that is still waiting.
    waiting = stubs.run(assistant.id, stubs.thread("/tool get_weather {}").id)
    assert stubs.wait(waiting.id).status == run_pb2.TOOL_CALLS
    submit(stubs, run.id, "sunny")
    for stream in streams:
        assert run_pb2.COMPLETED in {e.status for e in stream}
    streams = [open_listen(stubs, waiting.id)[0] for _ in range(MAX_LISTENS)]
    with pytest.raises(grpc.RpcError) as again:
        open_listen(stubs, waiting.id)
    assert_exhausted(again.value, "LISTEN_STREAMS_LIMIT", "listen", MAX_LISTENS)
    submit(stubs, waiting.id, "rain")
    for stream in streams:
        assert run_pb2.COMPLETED in {e.status for e in stream}
    other.close()
    stubs.close()


# ---- tools per assistant and per run ----------------------------------------------------------


def test_tools_per_assistant_and_run(limited: ServerProcess) -> None:
    stubs = connect(limited, "tools")
    names = [f"tool_{i}" for i in range(MAX_TOOLS + 1)]
    assistant = tool_assistant(stubs, *names[:MAX_TOOLS])  # exactly at the limit
    assert len(assistant.tools) == MAX_TOOLS
    with pytest.raises(grpc.RpcError) as create:
        tool_assistant(stubs, *names)
    assert f"at most {MAX_TOOLS}" in assert_invalid(create.value, "tools")

    update = assistant_pb2.UpdateAssistantRequest(
        assistant_id=assistant.id, update_mask=FieldMask(paths=["tools"])
    )
    for name in names:
        update.tools.add().function.name = name
    with pytest.raises(grpc.RpcError) as updated:
        stubs.assistants.Update(update, timeout=10)
    assert_invalid(updated.value, "tools")
    fetched = stubs.assistants.Get(assistant_pb2.GetAssistantRequest(assistant_id=assistant.id))
    assert fetched == assistant  # the refused update changed nothing

    thread = stubs.thread("hello")
    request = run_pb2.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id, override_tools=True)
    for name in names:
        request.tools.add().function.name = name
    with pytest.raises(grpc.RpcError) as run_refused:
        stubs.runs.Create(request, timeout=10)
    assert_invalid(run_refused.value, "tools")
    assert runs_of(stubs, thread.id) == []
    del request.tools[MAX_TOOLS:]
    run = stubs.runs.Create(request, timeout=10)  # exactly at the limit
    assert len(run.tools) == MAX_TOOLS and stubs.wait(run.id).status == run_pb2.COMPLETED
    stubs.close()


def test_assistant_tools_over_a_lowered_limit_refuse_the_run(
    make_server: Callable[..., ServerProcess], new_database: Callable[..., TestDatabase]
) -> None:
    """An assistant saved under a higher --max-tools cannot start runs with more tools than the
    current limit: the run is checked with the tools it would carry."""
    database = new_database("lowered")
    first = make_server("--max-tools", "3", database=database)
    stubs = Stubs.connect(first.address)
    assistant = tool_assistant(stubs, "a", "b", "c")
    thread = stubs.thread("hello")
    stubs.close()
    first.stop()
    second = make_server("--max-tools", "2", database=database)
    stubs = Stubs.connect(second.address)
    with pytest.raises(grpc.RpcError) as refused:
        stubs.run(assistant.id, thread.id)
    assert "has 3 tools; at most 2" in assert_invalid(refused.value, "tools")
    assert runs_of(stubs, thread.id) == []
    run = stubs.run(assistant.id, thread.id, override_tools=True, tools=assistant.tools[:2])
    assert stubs.wait(run.id).status == run_pb2.COMPLETED
    stubs.close()


# ---- message text size ------------------------------------------------------------------------


def test_message_text_size(limited: ServerProcess) -> None:
    stubs = connect(limited, "text")
    at_limit, over = "x" * MAX_MESSAGE, "x" * (MAX_MESSAGE + 1)
    thread = stubs.thread(at_limit)
    stubs.say(thread.id, at_limit)

    with pytest.raises(grpc.RpcError) as text:
        stubs.say(thread.id, over)
    assert f"{MAX_MESSAGE + 1} characters long; at most {MAX_MESSAGE}" in assert_invalid(text.value, "text")
    parts = [
        message_pb2.ContentPart(text=message_pb2.TextPart(text=half)) for half in (at_limit[:25], over[25:])
    ]
    with pytest.raises(grpc.RpcError) as content:
        stubs.messages.Create(
            message_pb2.CreateMessageRequest(thread_id=thread.id, content=parts), timeout=10
        )
    assert_invalid(content.value, "content")
    with pytest.raises(grpc.RpcError) as in_thread:
        stubs.thread("fine", over)
    assert_invalid(in_thread.value, "messages[1].text")

    assistant = stubs.assistant(name="echo")
    request = run_pb2.CreateRunRequest(
        assistant_id=assistant.id,
        thread_id=thread.id,
        additional_messages=[message_pb2.MessageInput(text=over)],
    )
    with pytest.raises(grpc.RpcError) as additional:
        stubs.runs.Create(request, timeout=10)
    assert_invalid(additional.value, "additional_messages[0].text")
    # Nothing refused was stored: the thread holds its two messages and no run.
    assert [len(m.content[0].text.text) for m in messages_of(stubs, thread.id)] == [MAX_MESSAGE] * 2
    assert runs_of(stubs, thread.id) == []
    threads = stubs.threads.List(thread_pb2.ListThreadsRequest(page_size=100), timeout=10).threads
    assert [t.id for t in threads] == [thread.id]

    request.additional_messages[0].text = at_limit
    run = stubs.runs.Create(request, timeout=10)
    assert stubs.wait(run.id).status == run_pb2.COMPLETED
    stubs.close()


# ---- tool result size -------------------------------------------------------------------------


def test_tool_output_sizes(limited: ServerProcess) -> None:
    stubs = connect(limited, "outputs")
    assistant = tool_assistant(stubs, "a", "b")
    run = stubs.run(assistant.id, stubs.thread("/tool a {}\n/tool b {}").id)
    paused = stubs.wait(run.id)
    first, second = (c.id for c in paused.required_tool_calls)

    def results(*outputs: str) -> run_pb2.SubmitToolResultsRequest:
        return run_pb2.SubmitToolResultsRequest(
            run_id=run.id,
            tool_results=[
                common_pb2.ToolResult(tool_call_id=call_id, output=output)
                for call_id, output in zip((first, second), outputs, strict=True)
            ],
        )

    rest = MAX_OUTPUTS_TOTAL - MAX_OUTPUT
    with pytest.raises(grpc.RpcError) as one:
        stubs.runs.SubmitToolResults(results("o" * (MAX_OUTPUT + 1), "p"), timeout=10)
    assert f"at most {MAX_OUTPUT}" in assert_invalid(one.value, "tool_results[0].output")
    with pytest.raises(grpc.RpcError) as total:
        stubs.runs.SubmitToolResults(results("o" * MAX_OUTPUT, "p" * (rest + 1)), timeout=10)
    description = assert_invalid(total.value, "tool_results")
    assert f"total {MAX_OUTPUTS_TOTAL + 1} characters; at most {MAX_OUTPUTS_TOTAL}" in description

    # The refusals changed nothing: still waiting, with the same steps.
    again = stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id), timeout=10)
    assert again.status == run_pb2.TOOL_CALLS and again.updated_at == paused.updated_at
    steps = stubs.runs.ListSteps(run_pb2.ListRunStepsRequest(run_id=run.id), timeout=10).steps
    assert all(not call.output for step in steps for call in step.tool_calls.tool_calls)

    stubs.runs.SubmitToolResults(results("o" * MAX_OUTPUT, "p" * rest), timeout=10)  # exactly at both
    assert stubs.wait(run.id).status == run_pb2.COMPLETED
    stubs.close()


# ---- configuration ----------------------------------------------------------------------------


def test_limits_come_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config([]).limits == Limits()
    monkeypatch.setenv("SPINDLE_MAX_MESSAGE_CHARS", "1000")
    monkeypatch.setenv("SPINDLE_MAX_ACTIVE_RUNS_PER_PROJECT", "7")
    config = parse_config(["--max-tools", "5", "--max-listen-streams-per-project", "9"])
    assert config.limits == Limits(
        max_active_runs_per_project=7,
        max_listen_streams_per_project=9,
        max_tools=5,
        max_message_chars=1000,
    )


@pytest.mark.parametrize(
    "flag",
    [
        "--max-active-runs-per-project",
        "--max-listen-streams-per-project",
        "--max-tools",
        "--max-message-chars",
        "--max-tool-output-chars",
        "--max-tool-outputs-total-chars",
    ],
)
def test_a_limit_below_one_is_a_usage_error(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config([flag, "0"])
    assert exited.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err
