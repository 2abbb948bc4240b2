"""Spindle against a real OpenAI-compatible server: llama-cpp-python's, with a tiny random model.

Opt-in: `make llama` builds llama-cpp-python (about three minutes) into .venv-llama, and
`make test` then points SPINDLE_LLAMA_PYTHON at it; without it these tests skip. The model is
random (tests/llama_model.py), so its words are noise, but everything on the wire is real:
llama.cpp's streaming, its tool calls (chatml-function-calling), its usage and its errors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from spindle.v1 import assistant_pb2, common_pb2, run_pb2
from support.server import ServerProcess
from support.stubs import Stubs

LLAMA_PYTHON = os.environ.get("SPINDLE_LLAMA_PYTHON", "")
EventType = run_pb2.StreamEvent


def _llama_ready() -> bool:
    if not LLAMA_PYTHON:
        return False
    try:
        probe = subprocess.run(
            [LLAMA_PYTHON, "-c", "import llama_cpp.server, gguf"], capture_output=True, timeout=60
        )
    except OSError:
        return False
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _llama_ready(), reason="llama-cpp-python not built (make llama)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("llama")
    model = folder / "tiny.gguf"
    subprocess.run(
        [
            LLAMA_PYTHON,
            "-c",
            f"import pathlib, llama_model; llama_model.write_tiny_llama(pathlib.Path({str(model)!r}))",
        ],
        cwd=Path(__file__).parent,
        check=True,
        timeout=60,
    )
    port = _free_port()
    process = subprocess.Popen(
        [
            LLAMA_PYTHON,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--chat_format",
            "chatml-function-calling",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "512",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def api(llama_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stubs]:
    database = tmp_path_factory.mktemp("spindle-llama") / "spindle.db"
    server = ServerProcess(
        database,
        ["--provider", f"llama={llama_url},timeout=60,stall_timeout=60,max_retries=1,initial_backoff=0.05"],
    ).start()
    stubs = Stubs.connect(server.address)
    yield stubs
    stubs.close()
    server.stop()


def test_a_reply_streams_from_llama_cpp(api: Stubs) -> None:
    assistant = api.assistant(name="tiny", model="llama/tiny", instructions="Answer briefly.")
    run = api.run(
        assistant.id, api.thread("Hello there!").id, max_completion_tokens=16, temperature=0.7, top_p=0.9
    )
    done = api.wait(run.id, timeout=60)
    assert done.status in (run_pb2.COMPLETED, run_pb2.INCOMPLETE), done.last_error
    if done.status == run_pb2.INCOMPLETE:
        assert done.incomplete_details.reason == "max_completion_tokens"
    events = api.events(run.id)
    streamed = "".join(e.message_delta.text for e in events if e.type == EventType.PARTIAL_MESSAGE)
    assert streamed == done.reply.content[0].text.text
    assert done.usage.prompt_tokens > 0 and done.usage.total_tokens > done.usage.prompt_tokens
    assert [e.index for e in events] == list(range(len(events)))


def test_a_forced_tool_call_round_trip(api: Stubs) -> None:
    request = assistant_pb2.CreateAssistantRequest(name="tools", model="llama/tiny")
    function = request.tools.add().function
    function.name = "get_weather"
    function.parameters.update(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    )
    assistant = api.assistants.Create(request)
    choice = common_pb2.ToolChoice(function_name="get_weather")
    run = api.run(
        assistant.id, api.thread("Weather in Paris?").id, tool_choice=choice, max_completion_tokens=64
    )
    paused = api.wait(run.id, timeout=60)
    assert paused.status == run_pb2.TOOL_CALLS, paused.last_error
    (call,) = paused.required_tool_calls
    assert call.id and call.function.name == "get_weather"
    assert call.function.arguments.startswith("{")  # grammar-constrained JSON (with random content)
    api.runs.SubmitToolResults(
        run_pb2.SubmitToolResultsRequest(
            run_id=run.id,
            tool_results=[common_pb2.ToolResult(tool_call_id=call.id, output=json.dumps({"temp_c": 21}))],
        )
    )
    resumed = api.wait(run.id, timeout=60)
    # The next turn ran on llama.cpp with the tool result in its prompt; the random model may
    # call the forced tool again, reply, or run out of budget: any of those, never FAILED.
    assert resumed.status in (run_pb2.COMPLETED, run_pb2.INCOMPLETE, run_pb2.TOOL_CALLS), resumed.last_error
    if resumed.status == run_pb2.TOOL_CALLS:
        api.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))


def test_json_object_output_is_accepted(api: Stubs) -> None:
    assistant = api.assistant(name="json", model="llama/tiny")
    json_mode = common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.JSON_OBJECT)
    run = api.run(
        assistant.id, api.thread("Reply in JSON.").id, response_format=json_mode, max_completion_tokens=8
    )
    done = api.wait(run.id, timeout=60)
    assert done.status in (run_pb2.COMPLETED, run_pb2.INCOMPLETE), done.last_error


def test_a_provider_error_fails_the_run_clearly(api: Stubs) -> None:
    """llama-cpp-python's server knows no json_schema response format and refuses the request
    (with HTTP 500, its quirk for invalid requests): the run fails with llama.cpp's reason."""
    assistant = api.assistant(name="schema", model="llama/tiny")
    schema = common_pb2.ResponseFormat(type=common_pb2.ResponseFormat.JSON_SCHEMA)
    schema.json_schema.name = "answer"
    schema.json_schema.schema.update({"type": "object", "properties": {"a": {"type": "string"}}})
    run = api.run(assistant.id, api.thread("hi").id, response_format=schema)
    done = api.wait(run.id, timeout=60)
    assert done.status == run_pb2.FAILED, done
    assert done.last_error.code == "server_error"
    assert "llama" in done.last_error.message and "json_object" in done.last_error.message
