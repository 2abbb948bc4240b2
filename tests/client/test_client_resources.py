"""Assistants, threads and messages through the sync client, and the error mapping."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from client_faults import CountUnary
from client_support import HeldPort

import spindle
from support.server import ServerProcess


def test_assistant_lifecycle(client: spindle.Client) -> None:
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return city

    created = client.assistants.create(
        name="lifecycle",
        instructions="Be brief.",
        tools=[get_weather],
        temperature=0.5,
        max_prompt_tokens=1000,
        truncation_strategy=5,
        response_format="json_object",
        labels={"team": "a"},
    )
    assert created.id.startswith("asst_") and created.model == "builtin"
    assert created.tools[0].name == "get_weather" and created.tools[0].description == "Weather in a city."
    assert created.temperature == 0.5 and created.max_prompt_tokens == 1000
    assert created.truncation_strategy == spindle.TruncationStrategy("last_messages", 5)
    assert created.response_format is not None and created.response_format.type == "json_object"
    assert client.assistants.get(created.id) == created
    updated = client.assistants.update(created, name="renamed", top_p=0.9)
    assert (updated.name, updated.instructions, updated.top_p) == ("renamed", "Be brief.", 0.9)
    client.assistants.delete(created.id)
    with pytest.raises(spindle.NotFound) as caught:
        client.assistants.get(created.id)
    assert caught.value.reason == "ASSISTANT_NOT_FOUND"
    assert caught.value.metadata == {"resource_id": created.id}


def test_lists_follow_page_tokens(client: spindle.Client) -> None:
    thread = client.threads.create(messages=[f"message {i}" for i in range(7)])
    texts = [m.text for m in client.messages.list(thread, order="asc", page_size=2)]
    assert texts == [f"message {i}" for i in range(7)]
    newest = [m.text for m in client.messages.list(thread.id, page_size=3, limit=4)]
    assert newest == ["message 6", "message 5", "message 4", "message 3"]
    made = [client.assistants.create(name=f"paged {i}").id for i in range(3)]
    listed = [a.id for a in client.assistants.list(page_size=2, limit=3)]  # newest first
    assert listed == made[::-1]


def test_thread_and_message_lifecycle(client: spindle.Client) -> None:
    thread = client.threads.create(
        name="t", labels={"k": "v"}, messages=[{"text": "hi", "labels": {"n": "1"}}]
    )
    assert client.threads.get(thread.id) == thread
    assert client.threads.update(thread, description="d").description == "d"
    message = client.messages.create(thread, ["part one, ", "part two"], labels={"x": "y"})
    assert message.parts == ("part one, ", "part two") and message.text == "part one, part two"
    assert message.role is spindle.MessageRole.USER
    assert client.messages.get(message.id) == message
    assert thread.id in {t.id for t in client.threads.list(limit=50)}
    client.threads.delete(thread)
    with pytest.raises(spindle.NotFound):
        client.threads.get(thread.id)


def test_invalid_argument_carries_field_violations(client: spindle.Client, echo: spindle.Assistant) -> None:
    thread = client.threads.create()
    with pytest.raises(spindle.InvalidArgument) as caught:
        client.runs.create(thread_id=thread, assistant_id=echo, temperature=9, labels={"": "x"})
    fields = {v.field for v in caught.value.field_violations}
    assert fields == {"temperature", "labels['']"}
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert isinstance(caught.value, spindle.ApiError) and caught.value.code.name == "INVALID_ARGUMENT"


def test_failed_precondition_for_a_second_active_run(client: spindle.Client, echo: spindle.Assistant) -> None:
    thread = client.threads.create(messages=["/sleep 2\nlong"])
    run = client.runs.create(thread_id=thread, assistant_id=echo)
    with pytest.raises(spindle.FailedPrecondition) as caught:
        client.runs.create(thread_id=thread, assistant_id=echo)
    assert caught.value.reason
    with pytest.raises(spindle.FailedPrecondition):
        client.messages.create(thread, "not now")
    run.cancel()


def test_api_key_is_sent_as_a_bearer_token(
    make_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server("--api-key", "s3cret=team")
    with spindle.Client(server.address) as anonymous, pytest.raises(spindle.Unauthenticated) as caught:
        anonymous.threads.create()
    assert caught.value.reason == "MISSING_API_KEY"
    with spindle.Client(server.address, api_key="wrong") as wrong, pytest.raises(spindle.Unauthenticated):
        wrong.threads.create()
    with spindle.Client(server.address, api_key="s3cret") as keyed:
        assert keyed.threads.create().created_by == "team"
    monkeypatch.setenv("SPINDLE_API_KEY", "s3cret")
    monkeypatch.setenv("SPINDLE_TARGET", server.address)
    with spindle.Client() as from_env:
        assert from_env.target == server.address
        assert from_env.threads.create().created_by == "team"


def test_unreachable_server_is_retried_until_the_deadline() -> None:
    counter = CountUnary()
    with HeldPort() as nothing:  # refused all along: no other process can start listening there
        unreachable = spindle.Client(f"127.0.0.1:{nothing.port}", interceptors=[counter])
        with unreachable as client, pytest.raises(spindle.Unavailable):
            client.threads.get("thread_x", timeout=1.0)
    assert counter.record.calls["/spindle.v1.ThreadService/Get"] >= 3


def test_a_limit_fetches_no_page_beyond_it(server: ServerProcess) -> None:
    counter = CountUnary()
    with spindle.Client(server.address, interceptors=[counter]) as client:
        thread = client.threads.create(messages=[f"m{i}" for i in range(5)])
        assert [m.text for m in client.messages.list(thread, order="asc", page_size=2, limit=2)] == [
            "m0",
            "m1",
        ]
        assert counter.record.calls["/spindle.v1.MessageService/List"] == 1
        assert list(client.messages.list(thread, limit=0)) == []
        assert counter.record.calls["/spindle.v1.MessageService/List"] == 1
