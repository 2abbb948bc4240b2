"""Spindle against a real OpenAI-compatible server: llama-cpp-python's, with a tiny random model.

Opt-in: `make llama` builds llama-cpp-python (about three minutes) into .venv-llama, and
`make test` then points SPINDLE_LLAMA_PYTHON at it; without it these tests skip. The model is
random (tests/llama_model.py), so its words are noise, but everything on the wire is real:
llama.cpp's streaming, its tool calls (chatml-function-calling), its usage and its errors.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


class RecordingProxy:
    """Forwards HTTP to llama.cpp's server byte for byte (streams as they come) and keeps each
    request's JSON body: what Spindle asked is seen, what llama.cpp answers stays real."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                with proxy._lock:
                    proxy.bodies.append(json.loads(raw or b"{}"))
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    connection.request("POST", self.path, raw, {"content-type": "application/json"})
                    answer = connection.getresponse()
                    self.send_response(answer.status)
                    self.send_header("content-type", answer.getheader("content-type") or "application/json")
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    while piece := answer.read1(65536):
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                finally:
                    connection.close()
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            bodies, self.bodies = self.bodies, []
            return bodies

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def proxy(llama_url: str) -> Iterator[RecordingProxy]:
    recording = RecordingProxy(llama_url)
    yield recording
    recording.close()


@pytest.fixture(scope="module")
def api(proxy: RecordingProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stubs]:
    database = tmp_path_factory.mktemp("spindle-llama") / "spindle.db"
    server = ServerProcess(
        database,
        ["--provider", f"llama={proxy.url},timeout=60,stall_timeout=60,max_retries=1,initial_backoff=0.05"],
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


def weather_assistant(api: Stubs) -> assistant_pb2.Assistant:
    request = assistant_pb2.CreateAssistantRequest(name="tools", model="llama/tiny")
    function = request.tools.add().function
    function.name = "get_weather"
    function.parameters.update(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    )
    return api.assistants.Create(request)


def settled_clearly(run: run_pb2.Run) -> None:
    """How a turn of the random model may end: a reply, a budget, tool calls, or FAILED with a
    reason (llama.cpp's chatml-function-calling answers `auto` with an empty message or an
    overflowing argument text); never COMPLETED with nothing in it."""
    assert run.status in (run_pb2.COMPLETED, run_pb2.INCOMPLETE, run_pb2.TOOL_CALLS, run_pb2.FAILED)
    if run.status == run_pb2.COMPLETED:
        assert run.reply.content[0].text.text, "COMPLETED with an empty reply"
    if run.status == run_pb2.FAILED:
        assert run.last_error.code in ("empty_response", "server_error") and run.last_error.message


def test_a_forced_tool_call_binds_the_first_turn_only(api: Stubs, proxy: RecordingProxy) -> None:
    proxy.take()
    choice = common_pb2.ToolChoice(function_name="get_weather")
    thread = api.thread("Weather in Paris?")
    run = api.run(
        weather_assistant(api).id, thread.id, tool_choice=choice, max_completion_tokens=64, temperature=0
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

    settled_clearly(resumed)
    sent = proxy.take()
    assert sent[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    # Forced again, llama.cpp would call get_weather after every result, forever.
    assert len(sent) > 1 and all(body["tool_choice"] == "auto" for body in sent[1:])
    if resumed.status == run_pb2.TOOL_CALLS:
        api.runs.Cancel(run_pb2.CancelRunRequest(run_id=run.id))


def test_an_empty_stream_with_tools_is_asked_again_without_streaming(
    api: Stubs, proxy: RecordingProxy
) -> None:
    """With tools and `auto`, llama-cpp-python's server ends the stream without a chunk whenever
    the model picks a tool ("Automatic streaming tool choice is not supported")."""
    proxy.take()
    run = api.run(weather_assistant(api).id, api.thread("Weather in Paris?").id, temperature=0)
    done = api.wait(run.id, timeout=90)

    settled_clearly(done)
    sent = proxy.take()
    assert sent[0]["stream"] is True and sent[0]["tool_choice"] == "auto"
    assert [body["stream"] for body in sent[1:]] == [False] * (len(sent) - 1) and sent[1:]
    if done.status == run_pb2.TOOL_CALLS:
        assert done.required_tool_calls[0].function.name == "get_weather"
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
