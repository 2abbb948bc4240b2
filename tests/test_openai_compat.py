"""The OpenAI Assistants facade, driven by the real `openai` package against a real server.

Code written for OpenAI's (retired) Assistants API runs unchanged with base_url pointed at
Spindle: polling helpers, streaming with an AssistantEventHandler, tool round trips, pagination
and the SDK's error classes, on the builtin model and on an OpenAI-compatible provider
(tests/fake_openai.py). A run started through this API is followed through gRPC Listen and
grpcurl: one engine, one store, one event log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AssistantEventHandler
from openai.types.beta import AssistantStreamEvent
from openai.types.beta.threads import Run, Text, TextDelta
from openai.types.beta.threads.runs import ToolCall

from fake_openai import FakeOpenAI, text_stream, tool_calls_stream
from spindle.v1 import run_pb2
from spindle_server.config import parse_config
from spindle_server.server import SpindleServer, StartupError
from support.certs import issue, make_ca, openssl_available
from support.server import ServerProcess
from support.stubs import Stubs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CALL = '/tool get_weather {"city": "Paris"}'
# Long enough that the run is still going when the test acts on it; it is cancelled, never awaited.
FOREVER = "/sleep 3600"


def client_for(process: ServerProcess, api_key: str = "unused") -> openai.OpenAI:
    port = process.serving["openai_port"]
    assert isinstance(port, int) and port > 0
    return openai.OpenAI(api_key=api_key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with client_for(server) as connected:
        yield connected


class Recorder(AssistantEventHandler):
    """Keeps every event name and the text deltas, as an application's handler would."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.deltas: list[str] = []
        self.texts: list[str] = []
        self.tool_calls: list[ToolCall] = []

    def on_event(self, event: AssistantStreamEvent) -> None:
        self.names.append(event.event)

    def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.deltas.append(delta.value or "")

    def on_text_done(self, text: Text) -> None:
        self.texts.append(text.value)

    def on_tool_call_done(self, tool_call: ToolCall) -> None:
        self.tool_calls.append(tool_call)


def reply_text(client: openai.OpenAI, thread_id: str, run_id: str) -> str:
    messages = client.beta.threads.messages.list(thread_id=thread_id, run_id=run_id)
    (message,) = messages.data
    assert message.role == "assistant" and message.run_id == run_id
    block = message.content[0]
    assert block.type == "text"
    return block.text.value


# ---- the builtin model -------------------------------------------------------------------------


def test_create_and_poll_completes_with_the_reply_in_the_thread(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin", name="echo", metadata={"team": "a"})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "Hello from OpenAI code"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed" and run.object == "thread.run"
    assert run.id.startswith("run_") and run.thread_id == thread.id and run.assistant_id == assistant.id
    assert (
        run.usage is not None
        and run.usage.total_tokens == run.usage.prompt_tokens + run.usage.completion_tokens
    )
    assert run.completed_at is not None and run.started_at is not None and run.last_error is None
    assert "Hello from OpenAI code" in reply_text(client, thread.id, run.id)
    fetched = client.beta.assistants.retrieve(assistant.id)
    assert fetched.name == "echo" and fetched.metadata == {"team": "a"} and fetched.model == "builtin"


def test_tool_round_trip_with_submit_tool_outputs_and_poll(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin", tools=[WEATHER])  # type: ignore[list-item]
    thread = client.beta.threads.create(messages=[{"role": "user", "content": TOOL_CALL}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "requires_action" and run.required_action is not None
    (call,) = run.required_action.submit_tool_outputs.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    done = client.beta.threads.runs.submit_tool_outputs_and_poll(
        thread_id=thread.id, run_id=run.id, tool_outputs=[{"tool_call_id": call.id, "output": "sunny, 21C"}]
    )
    assert done.status == "completed" and done.required_action is None
    assert "sunny, 21C" in reply_text(client, thread.id, run.id)
    steps = client.beta.threads.runs.steps.list(thread_id=thread.id, run_id=run.id, order="asc")
    kinds = [(step.type, step.status) for step in steps]
    assert kinds == [("tool_calls", "completed"), ("message_creation", "completed")]
    tool_step = steps.data[0]
    assert tool_step.step_details.type == "tool_calls"
    (answered,) = tool_step.step_details.tool_calls
    assert answered.type == "function" and answered.id == call.id and answered.function.output == "sunny, 21C"
    one = client.beta.threads.runs.steps.retrieve(step_id=tool_step.id, thread_id=thread.id, run_id=run.id)
    assert one.id == tool_step.id and one.run_id == run.id


def test_stream_delivers_openai_events_in_order_and_text_deltas(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "stream these words please"}])
    handler = Recorder()
    with client.beta.threads.runs.stream(
        thread_id=thread.id, assistant_id=assistant.id, event_handler=handler
    ) as s:
        s.until_done()
    run = handler.current_run
    assert run is not None and run.status == "completed"
    names = handler.names
    assert names[:7] == [
        "thread.run.created",
        "thread.run.queued",
        "thread.run.in_progress",
        "thread.run.step.created",
        "thread.run.step.in_progress",
        "thread.message.created",
        "thread.message.in_progress",
    ]
    assert names[-3:] == ["thread.message.completed", "thread.run.step.completed", "thread.run.completed"]
    assert set(names[7:-3]) == {"thread.message.delta"}  # how many: as the engine coalesced them
    text = reply_text(client, thread.id, run.id)
    assert "".join(handler.deltas) == text and handler.texts == [text]
    assert "stream these words please" in text


def test_stream_requires_action_answered_with_submit_tool_outputs_stream(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin", tools=[WEATHER])  # type: ignore[list-item]
    thread = client.beta.threads.create(messages=[{"role": "user", "content": TOOL_CALL}])
    first = Recorder()
    with client.beta.threads.runs.stream(
        thread_id=thread.id, assistant_id=assistant.id, event_handler=first
    ) as s:
        s.until_done()
    run = first.current_run
    assert run is not None and run.status == "requires_action" and run.required_action is not None
    assert first.names[-1] == "thread.run.requires_action"
    assert "thread.run.step.delta" in first.names and "thread.message.created" not in first.names
    (call,) = run.required_action.submit_tool_outputs.tool_calls
    second = Recorder()
    with client.beta.threads.runs.submit_tool_outputs_stream(
        thread_id=thread.id,
        run_id=run.id,
        tool_outputs=[{"tool_call_id": call.id, "output": "rain"}],
        event_handler=second,
    ) as s:
        s.until_done()
    final = second.current_run
    assert final is not None and final.status == "completed"
    assert second.names[0] == "thread.run.step.completed"  # the tool step, now with its output
    assert second.names.index("thread.run.queued") < second.names.index("thread.message.created")
    assert second.names[-1] == "thread.run.completed"
    assert "thread.run.requires_action" not in second.names  # the answered round is not replayed
    assert "rain" in "".join(second.deltas)
    assert "".join(second.deltas) == reply_text(client, thread.id, run.id)

    # The same submission again (a client's retry): nothing is submitted twice, and its stream
    # replays the same continuation of the run.
    again = Recorder()
    with client.beta.threads.runs.submit_tool_outputs_stream(
        thread_id=thread.id,
        run_id=run.id,
        tool_outputs=[{"tool_call_id": call.id, "output": "rain"}],
        event_handler=again,
    ) as s:
        s.until_done()
    assert again.names == second.names and again.deltas == second.deltas


def test_create_thread_and_run_poll(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin")
    run = client.beta.threads.create_and_run_poll(
        assistant_id=assistant.id,
        thread={"messages": [{"role": "user", "content": "one shot"}], "metadata": {"source": "sdk"}},
        metadata={"kind": "oneshot"},
    )
    assert run.status == "completed" and run.metadata == {"kind": "oneshot"}
    assert client.beta.threads.retrieve(run.thread_id).metadata == {"source": "sdk"}
    assert "one shot" in reply_text(client, run.thread_id, run.id)


def test_create_thread_and_run_stream_opens_with_thread_created(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin")
    handler = Recorder()
    with client.beta.threads.create_and_run_stream(
        assistant_id=assistant.id,
        thread={"messages": [{"role": "user", "content": "hi"}]},
        event_handler=handler,
    ) as s:
        s.until_done()
    assert handler.names[:2] == ["thread.created", "thread.run.created"]
    assert handler.names[-1] == "thread.run.completed"


def test_list_auto_paginates_in_both_orders_and_before(client: openai.OpenAI) -> None:
    texts = [f"message {index}" for index in range(7)]
    thread = client.beta.threads.create(messages=[{"role": "user", "content": text} for text in texts])

    def listed(**params: Any) -> list[str]:
        page = client.beta.threads.messages.list(thread_id=thread.id, limit=3, **params)
        return [message.content[0].text.value for message in page]  # type: ignore[union-attr]

    assert listed(order="asc") == texts
    assert listed() == texts[::-1]  # OpenAI's default order: newest first
    first = client.beta.threads.messages.list(thread_id=thread.id, limit=3, order="asc")
    assert first.has_more and len(first.data) == 3
    second = first.get_next_page()
    assert [m.id for m in second.data] != [m.id for m in first.data] and second.has_more
    earlier = client.beta.threads.messages.list(
        thread_id=thread.id, limit=2, order="asc", before=second.data[0].id
    )
    assert [m.id for m in earlier.data] == [m.id for m in first.data[1:]] and earlier.has_more

    # An `after` this process did not hand out (as after a restart) is found by walking.
    middle = client.beta.threads.messages.list(
        thread_id=thread.id, limit=2, order="asc", after=first.data[0].id
    )
    assert [m.id for m in middle.data] == [m.id for m in first.data[1:]]


def test_runs_list_pages_after_and_modify_metadata(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin")
    thread = client.beta.threads.create()
    run_ids = []
    for index in range(3):
        client.beta.threads.messages.create(thread_id=thread.id, role="user", content=f"turn {index}")
        run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
        run_ids.append(run.id)
    paged = client.beta.threads.runs.list(thread_id=thread.id, limit=2, order="asc")
    assert [run.id for run in paged] == run_ids
    changed = client.beta.threads.runs.update(
        run_id=run_ids[0], thread_id=thread.id, metadata={"reviewed": "yes"}
    )
    assert changed.metadata == {"reviewed": "yes"}
    assert client.beta.threads.runs.retrieve(run_id=run_ids[0], thread_id=thread.id).metadata == {
        "reviewed": "yes"
    }


def test_cancel_and_a_second_active_run_is_bad_request(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": FOREVER}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "queued"
    with pytest.raises(openai.BadRequestError) as second:
        client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    assert second.value.status_code == 400 and second.value.code == "thread_has_active_run"
    with pytest.raises(openai.BadRequestError):  # nor a message while it runs
        client.beta.threads.messages.create(thread_id=thread.id, role="user", content="and another")
    cancelling = client.beta.threads.runs.cancel(run_id=run.id, thread_id=thread.id)
    assert cancelling.status in ("cancelling", "cancelled")
    final = client.beta.threads.runs.poll(run.id, thread_id=thread.id, poll_interval_ms=20)
    assert final.status == "cancelled" and final.cancelled_at is not None


def test_sdk_error_classes_and_openai_error_body(client: openai.OpenAI) -> None:
    thread = client.beta.threads.create()
    with pytest.raises(openai.NotFoundError) as missing:
        client.beta.threads.runs.retrieve(run_id="run_missing", thread_id=thread.id)
    assert missing.value.status_code == 404 and missing.value.code == "run_not_found"
    assert isinstance(missing.value.body, dict) and set(missing.value.body) == {
        "message",
        "type",
        "param",
        "code",
    }
    with pytest.raises(openai.NotFoundError):
        client.beta.assistants.retrieve("asst_missing")
    with pytest.raises(openai.BadRequestError) as invalid:
        client.beta.assistants.create(model="builtin", temperature=7.5)
    assert (
        invalid.value.code == "invalid_argument" and invalid.value.param == "completion_options.temperature"
    )
    with pytest.raises(openai.BadRequestError) as unknown_model:
        client.beta.assistants.create(model="nowhere/gpt")
    assert unknown_model.value.param == "model"


def test_unsupported_features_are_refused_not_ignored(client: openai.OpenAI) -> None:
    refused: list[Callable[[], object]] = [
        lambda: client.beta.assistants.create(model="builtin", tools=[{"type": "file_search"}]),
        lambda: client.beta.assistants.create(model="builtin", tools=[{"type": "code_interpreter"}]),
        lambda: client.beta.threads.create(tool_resources={"file_search": {"vector_store_ids": ["vs_1"]}}),
        lambda: client.vector_stores.create(name="docs"),
        lambda: client.files.list(),
    ]
    for call in refused:
        with pytest.raises(openai.BadRequestError) as error:
            call()
        assert error.value.code == "unsupported", error.value.message
        assert "not supported" in error.value.message


def test_crud_modify_delete_and_idempotency_key(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin", temperature=0.5, top_p=0.9)
    changed = client.beta.assistants.update(assistant.id, temperature=0.2, name="renamed")
    assert changed.name == "renamed" and changed.temperature == 0.2 and changed.top_p == 0.9
    thread = client.beta.threads.create(metadata={"a": "1"})
    assert client.beta.threads.update(thread.id, metadata={"b": "2"}).metadata == {"b": "2"}
    message = client.beta.threads.messages.create(thread_id=thread.id, role="user", content="kept")
    fetched = client.beta.threads.messages.retrieve(message_id=message.id, thread_id=thread.id)
    assert fetched.content[0].text.value == "kept" and fetched.status == "completed"  # type: ignore[union-attr]

    key = {"Idempotency-Key": f"compat-{assistant.id}"}
    once = client.beta.threads.create(extra_headers=key)
    again = client.beta.threads.create(extra_headers=key)
    assert once.id == again.id

    assert client.beta.threads.delete(thread.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.retrieve(thread.id)
    assert client.beta.assistants.delete(assistant.id).deleted


def test_api_keys_map_to_projects(make_server: Callable[..., ServerProcess]) -> None:
    process = make_server("--api-key", "key-a=alpha", "--api-key", "key-b=beta")
    with client_for(process, "wrong") as wrong, pytest.raises(openai.AuthenticationError) as denied:
        wrong.beta.assistants.list()
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    with client_for(process, "key-a") as alpha, client_for(process, "key-b") as beta:
        assistant = alpha.beta.assistants.create(model="builtin")
        assert [item.id for item in alpha.beta.assistants.list()] == [assistant.id]
        assert beta.beta.assistants.list().data == []
        with pytest.raises(openai.NotFoundError):
            beta.beta.assistants.retrieve(assistant.id)
    url = f"http://127.0.0.1:{process.serving['openai_port']}/v1/assistants"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url, timeout=30)
    assert missing.value.code == 401 and json.load(missing.value)["error"]["code"] == "missing_api_key"


@pytest.mark.skipif(not openssl_available(), reason="needs the openssl command")
def test_tls_and_client_certificates_apply_to_the_openai_port(
    make_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    ca = make_ca(tmp_path, "ca")
    server_pair, client_pair = (
        issue(ca, tmp_path, "server", server=True),
        issue(ca, tmp_path, "client", server=False),
    )
    process = make_server(
        *(
            "--tls-cert",
            str(server_pair.cert),
            "--tls-key",
            str(server_pair.key),
            "--tls-client-ca",
            str(ca.cert),
        )
    )
    url = f"https://127.0.0.1:{process.serving['openai_port']}/v1"

    def tls_client(with_certificate: bool) -> openai.OpenAI:
        context = ssl.create_default_context(cafile=str(ca.cert))
        if with_certificate:
            context.load_cert_chain(str(client_pair.cert), str(client_pair.key))
        http = openai.DefaultHttpxClient(verify=context)
        return openai.OpenAI(api_key="unused", base_url=url, max_retries=0, timeout=30, http_client=http)

    with tls_client(True) as trusted:
        assert trusted.beta.threads.create().id.startswith("thread_")
    with tls_client(False) as anonymous, pytest.raises(openai.APIConnectionError):
        anonymous.beta.threads.create()


def test_stopping_server_ends_open_streams_with_an_error(make_server: Callable[..., ServerProcess]) -> None:
    process = make_server("--grace-period", "1")
    with client_for(process) as client:
        assistant = client.beta.assistants.create(model="builtin")
        thread = client.beta.threads.create(messages=[{"role": "user", "content": FOREVER}])
        with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as stream:
            seen = []
            for event in stream:
                seen.append(event.event)
                if event.event == "thread.run.in_progress":
                    break
            assert process.stop() == 0  # the stream is still open: stop() returns once it is ended
            with pytest.raises(openai.APIError, match="the server is stopping"):
                seen.extend(event.event for event in stream)
    assert seen[:3] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"]


async def test_a_taken_openai_port_fails_the_start_unless_auto_chose_it(tmp_path: Path) -> None:
    """In this process: the same config with the port given (a startup error) or chosen by auto."""
    base = parse_config(["--port", "0", "--database", str(tmp_path / "spindle.db")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        given = SpindleServer(dataclasses.replace(base, openai_port=port, openai_port_auto=False))
        with pytest.raises(StartupError, match=f"cannot serve the OpenAI API on 127.0.0.1:{port}"):
            await given.start()
        chosen = SpindleServer(dataclasses.replace(base, openai_port=port, openai_port_auto=True))
        await chosen.start()
        try:
            assert chosen.openai_port is None and chosen.port > 0  # gRPC serves; the OpenAI API is off
        finally:
            await chosen.stop()


def test_openai_port_off_serves_no_http(make_server: Callable[..., ServerProcess]) -> None:
    process = make_server("--openai-port", "off")
    assert process.serving["openai_port"] is None


# ---- one engine, one log: followed through gRPC and grpcurl -------------------------------------


def test_run_created_with_openai_is_followed_by_grpc_listen(
    client: openai.OpenAI, stubs: Stubs, server: ServerProcess
) -> None:
    assistant = client.beta.assistants.create(model="builtin")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "seen from both sides"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    events = stubs.events(run.id)
    assert events[-1].type == run_pb2.StreamEvent.DONE
    streamed = "".join(e.message_delta.text for e in events if e.type == run_pb2.StreamEvent.PARTIAL_MESSAGE)
    assert streamed == events[-1].done.message.content[0].text.text == reply_text(client, thread.id, run.id)
    assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id)).status == run_pb2.COMPLETED

    grpcurl = Path(sys.executable).parent / "grpcurl"
    env = {**os.environ, "PATH": f"{grpcurl.parent}{os.pathsep}{os.environ['PATH']}"}
    listened = subprocess.run(
        [
            "grpcurl",
            "-plaintext",
            "-d",
            json.dumps({"run_id": run.id}),
            server.address,
            "spindle.v1.RunService/Listen",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listened.returncode == 0, listened.stderr[-2000:]
    assert '"type": "DONE"' in listened.stdout and "seen from both sides" in listened.stdout


# ---- an OpenAI-compatible provider behind the facade ----------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as running:
        yield running


@pytest.fixture(scope="module")
def provider_client(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    database = tmp_path_factory.mktemp("openai-compat") / "spindle.db"
    flags = ["--provider", f"fake={fake.base_url},max_retries=0"]
    process = ServerProcess(database, flags, {"SPINDLE_PROVIDER_FAKE_API_KEY": "sk-fake"}).start()
    with client_for(process) as connected:
        yield connected
    process.kill()


def test_provider_model_streams_a_tool_round_trip(provider_client: openai.OpenAI, fake: FakeOpenAI) -> None:
    client = provider_client
    fake.reset()
    fake.enqueue(
        tool_calls_stream([("call_fake_1", "get_weather", ['{"city"', ': "Oslo"}'])]),
        text_stream("Oslo is ", "cold"),
    )
    assistant = client.beta.assistants.create(model="fake/gpt-test", tools=[WEATHER])  # type: ignore[list-item]
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "Weather in Oslo?"}])
    first = Recorder()
    with client.beta.threads.runs.stream(
        thread_id=thread.id, assistant_id=assistant.id, event_handler=first
    ) as s:
        s.until_done()
    run: Run | None = first.current_run
    assert run is not None and run.status == "requires_action" and run.required_action is not None
    (call,) = run.required_action.submit_tool_outputs.tool_calls
    assert call.id == "call_fake_1" and json.loads(call.function.arguments) == {"city": "Oslo"}
    # The SDK's snapshot, assembled from the step deltas (as many as the engine coalesced them to).
    assert "thread.run.step.delta" in first.names
    assert [(c.type, c.id) for c in first.tool_calls] == [("function", "call_fake_1")]
    assembled = first.tool_calls[0]
    assert assembled.type == "function" and json.loads(assembled.function.arguments) == {"city": "Oslo"}
    second = Recorder()
    with client.beta.threads.runs.submit_tool_outputs_stream(
        thread_id=thread.id,
        run_id=run.id,
        tool_outputs=[{"tool_call_id": call.id, "output": "-3C"}],
        event_handler=second,
    ) as s:
        s.until_done()
    assert second.current_run is not None and second.current_run.status == "completed"
    assert "".join(second.deltas) == "Oslo is cold" and second.texts == ["Oslo is cold"]
    assert reply_text(client, thread.id, run.id) == "Oslo is cold"
    sent = fake.requests[-1].body
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": "call_fake_1", "content": "-3C"}


def _post(client: openai.OpenAI, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{client.base_url}{path}", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_malformed_bodies_are_400_with_the_field_never_500(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="builtin")
    thread = client.beta.threads.create()
    run_path = f"threads/{thread.id}/runs"
    deep = '{"a":' * 5000 + "{}" + "}" * 5000
    function = f'{{"name": "f", "parameters": {deep}}}'
    nested = f'{{"model": "builtin", "tools": [{{"type": "function", "function": {function}}}]}}'
    cases: list[tuple[str, Any, str]] = [
        ("assistants", {"model": "builtin", "tools": "x"}, "tools"),
        ("assistants", {"model": "builtin", "tools": [1]}, "tools[0].type"),
        ("assistants", {"model": "builtin", "metadata": {"a": 1}}, "metadata.a"),
        ("assistants", {"model": 5}, "model"),
        ("assistants", {"model": "builtin", "temperature": True}, "temperature"),
        ("assistants", {"model": "builtin", "surprise": 1}, "surprise"),
        ("assistants", {"model": "builtin", "response_format": 5}, "response_format"),
        ("assistants", [1, 2], "body"),
        ("threads", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("threads", {"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        (
            "threads",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0]",
        ),
        (run_path, {"assistant_id": assistant.id, "truncation_strategy": "x"}, "truncation_strategy"),
        (run_path, {"assistant_id": assistant.id, "tool_choice": {"type": "function"}}, "tool_choice"),
        (run_path, {"assistant_id": assistant.id, "additional_messages": "x"}, "additional_messages"),
        (run_path, {"assistant_id": 5}, "assistant_id"),
        (run_path, {}, "assistant_id"),
        (run_path, {"assistant_id": assistant.id, "max_completion_tokens": -1}, "max_completion_tokens"),
        ("assistants", nested, ""),
    ]
    for path, body, param in cases:
        status, answer = _post(
            client, path, body.encode() if isinstance(body, str) else json.dumps(body).encode()
        )
        assert status == 400, (path, str(body)[:200], answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        if param:
            assert answer["error"]["param"] == param, (body, answer)
    for raw in (b"{not json", b"\xff\xfe", b"[" * 100_000):
        status, answer = _post(client, "assistants", raw)
        assert status == 400 and answer["error"]["param"] == "body", answer
    status, answer = _post(
        client, "assistants", json.dumps({"model": "builtin", "name": "x" * 9_000_000}).encode()
    )
    assert status == 400 and answer["error"]["code"] == "request_too_large"
    # Nothing half-written: the thread has no run and no message.
    assert client.beta.threads.runs.list(thread_id=thread.id).data == []
    assert client.beta.threads.messages.list(thread_id=thread.id).data == []


def test_openai_port_flag() -> None:
    assert parse_config([]).openai_port == 50052  # --port 50051 + 1
    assert parse_config(["--port", "7000"]).openai_port == 7001
    assert parse_config(["--port", "0"]).openai_port == 0
    assert parse_config(["--openai-port", "off"]).openai_port is None
    assert parse_config([]).openai_port_auto and not parse_config(["--openai-port", "50052"]).openai_port_auto
    chosen = parse_config(["--openai-port", "8080", "--openai-host", "0.0.0.0", "--api-key", "k=p"])
    assert (chosen.openai_port, chosen.openai_host) == (8080, "0.0.0.0")
    for wrong in ("nope", "70000"):
        with pytest.raises(SystemExit):
            parse_config(["--openai-port", wrong])


def test_provider_two_tool_rounds_each_streamed_after_its_submission(
    provider_client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    client = provider_client
    fake.reset()
    fake.enqueue(
        tool_calls_stream([("call_round_1", "get_weather", ['{"city": "Oslo"}'])]),
        tool_calls_stream([("call_round_2", "get_weather", ['{"city": "Rome"}'])]),
        text_stream("Oslo cold, ", "Rome warm"),
    )
    assistant = client.beta.assistants.create(model="fake/gpt-test", tools=[WEATHER])  # type: ignore[list-item]
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "Oslo and Rome?"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.required_action is not None
    assert [c.id for c in run.required_action.submit_tool_outputs.tool_calls] == ["call_round_1"]
    second = Recorder()
    with client.beta.threads.runs.submit_tool_outputs_stream(
        thread_id=thread.id,
        run_id=run.id,
        tool_outputs=[{"tool_call_id": "call_round_1", "output": "-3C"}],
        event_handler=second,
    ) as s:
        s.until_done()
    paused = second.current_run
    assert paused is not None and paused.status == "requires_action" and paused.required_action is not None
    assert [c.id for c in paused.required_action.submit_tool_outputs.tool_calls] == ["call_round_2"]
    assert [c.id for c in second.tool_calls] == ["call_round_2"]  # round 1 was not replayed
    third = Recorder()
    with client.beta.threads.runs.submit_tool_outputs_stream(
        thread_id=thread.id,
        run_id=run.id,
        tool_outputs=[{"tool_call_id": "call_round_2", "output": "24C"}],
        event_handler=third,
    ) as s:
        s.until_done()
    assert third.current_run is not None and third.current_run.status == "completed"
    assert third.tool_calls == [] and "".join(third.deltas) == "Oslo cold, Rome warm"
    steps = client.beta.threads.runs.steps.list(thread_id=thread.id, run_id=run.id, order="asc")
    assert [step.type for step in steps] == ["tool_calls", "tool_calls", "message_creation"]
