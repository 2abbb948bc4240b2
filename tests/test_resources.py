"""Assistants, threads and messages: CRUD, update masks, pagination, labels, request_id."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from spindle.v1 import assistant_pb2, common_pb2, message_pb2, run_pb2, thread_pb2
from support.server import ServerProcess
from support.stubs import Stubs, error_details


def test_assistant_crud(stubs: Stubs) -> None:
    created = stubs.assistant(
        name="helper",
        description="helps",
        instructions="be nice",
        labels={"env": "test"},
        completion_options=common_pb2.CompletionOptions(temperature=0.3, max_tokens=100),
    )
    assert created.id.startswith("asst_") and created.model == "builtin"
    assert created.created_at == created.updated_at
    fetched = stubs.assistants.Get(assistant_pb2.GetAssistantRequest(assistant_id=created.id))
    assert fetched == created
    updated = stubs.assistants.Update(
        assistant_pb2.UpdateAssistantRequest(
            assistant_id=created.id,
            update_mask=FieldMask(paths=["name", "labels"]),
            name="renamed",
            labels={},
        )
    )
    assert updated.name == "renamed" and dict(updated.labels) == {}
    assert updated.instructions == "be nice" and updated.description == "helps"  # untouched
    assert updated.completion_options.temperature == pytest.approx(0.3)
    assert updated.updated_at.ToNanoseconds() > created.updated_at.ToNanoseconds()
    # Without a mask, the fields the request sets are replaced.
    again = stubs.assistants.Update(
        assistant_pb2.UpdateAssistantRequest(assistant_id=created.id, instructions="be brief")
    )
    assert again.instructions == "be brief" and again.name == "renamed"
    stubs.assistants.Delete(assistant_pb2.DeleteAssistantRequest(assistant_id=created.id))
    with pytest.raises(grpc.RpcError) as gone:
        stubs.assistants.Get(assistant_pb2.GetAssistantRequest(assistant_id=created.id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    info, _ = error_details(gone.value)
    assert info is not None and info.reason == "ASSISTANT_NOT_FOUND" and info.domain == "spindle.v1"


def test_runs_keep_working_after_their_assistant_is_deleted(stubs: Stubs) -> None:
    assistant = stubs.assistant(name="temporary", instructions="snapshot me")
    thread = stubs.thread("hi")
    run = stubs.run(assistant.id, thread.id)
    stubs.assistants.Delete(assistant_pb2.DeleteAssistantRequest(assistant_id=assistant.id))
    done = stubs.wait(run.id)
    assert done.status == run_pb2.COMPLETED and done.instructions == "snapshot me"


def test_thread_crud_and_cascade(stubs: Stubs) -> None:
    thread = stubs.threads.Create(
        thread_pb2.CreateThreadRequest(
            name="t",
            labels={"a": "b"},
            messages=[message_pb2.MessageInput(text="one"), message_pb2.MessageInput(text="two")],
        )
    )
    listed = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=thread.id, order=common_pb2.ASC))
    assert [m.content[0].text.text for m in listed.messages] == ["one", "two"]
    assert all(m.role == message_pb2.USER for m in listed.messages)
    updated = stubs.threads.Update(
        thread_pb2.UpdateThreadRequest(
            thread_id=thread.id, update_mask=FieldMask(paths=["description"]), description="d"
        )
    )
    assert updated.description == "d" and updated.name == "t" and dict(updated.labels) == {"a": "b"}
    run = stubs.run(stubs.assistant(name="x").id, thread.id)
    stubs.wait(run.id)
    stubs.threads.Delete(thread_pb2.DeleteThreadRequest(thread_id=thread.id))
    for call, request in (
        (stubs.threads.Get, thread_pb2.GetThreadRequest(thread_id=thread.id)),
        (stubs.runs.Get, run_pb2.GetRunRequest(run_id=run.id)),
        (stubs.messages.Get, message_pb2.GetMessageRequest(message_id=listed.messages[0].id)),
    ):
        with pytest.raises(grpc.RpcError) as gone:
            call(request)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as listen_gone:
        stubs.events(run.id)
    assert listen_gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_message_roles_and_content(stubs: Stubs) -> None:
    thread = stubs.thread()
    user = stubs.messages.Create(
        message_pb2.CreateMessageRequest(
            thread_id=thread.id,
            content=[
                message_pb2.ContentPart(text=message_pb2.TextPart(text="part one ")),
                message_pb2.ContentPart(text=message_pb2.TextPart(text="part two")),
            ],
            labels={"source": "test"},
        )
    )
    assert user.role == message_pb2.USER and len(user.content) == 2
    assert user.labels == {"source": "test"} and user.created_at.seconds > 0 and user.id.startswith("msg_")
    assistant_message = stubs.messages.Create(
        message_pb2.CreateMessageRequest(
            thread_id=thread.id, role=message_pb2.ASSISTANT, text="earlier answer"
        )
    )
    assert assistant_message.role == message_pb2.ASSISTANT
    assert stubs.messages.Get(message_pb2.GetMessageRequest(message_id=user.id)) == user
    done = stubs.wait(stubs.run(stubs.assistant(name="m").id, thread.id).id)
    assert done.reply.content[0].text.text == "You said: part one part two"
    by_run = stubs.messages.List(
        message_pb2.ListMessagesRequest(thread_id=thread.id, run_id=done.id)
    ).messages
    assert [m.id for m in by_run] == [done.reply.id]


@pytest.mark.parametrize("order", [common_pb2.ASC, common_pb2.DESC])
def test_pagination_walks_every_item_once(stubs: Stubs, order: int) -> None:
    thread = stubs.thread(*[f"message {i}" for i in range(25)])
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = stubs.messages.List(
            message_pb2.ListMessagesRequest(thread_id=thread.id, page_size=7, page_token=token, order=order)  # type: ignore[arg-type]
        )
        seen.extend(m.content[0].text.text for m in page.messages)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    expected = [f"message {i}" for i in range(25)]
    assert seen == (expected if order == common_pb2.ASC else expected[::-1])
    assert pages == 4


def test_page_size_defaults_and_caps(stubs: Stubs) -> None:
    thread = stubs.thread(*[f"m{i}" for i in range(30)])
    default = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=thread.id))
    assert len(default.messages) == 20 and default.next_page_token
    thread_many = stubs.threads.Create(thread_pb2.CreateThreadRequest())
    for i in range(3):
        stubs.say(thread_many.id, f"x{i}")
    capped = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=thread_many.id, page_size=1000))
    assert len(capped.messages) == 3 and not capped.next_page_token


def test_page_token_is_bound_to_its_listing(stubs: Stubs) -> None:
    thread = stubs.thread("a", "b", "c")
    page = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=thread.id, page_size=1))
    other = stubs.thread("z")
    with pytest.raises(grpc.RpcError) as reused:
        stubs.messages.List(
            message_pb2.ListMessagesRequest(thread_id=other.id, page_token=page.next_page_token)
        )
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, violations = error_details(reused.value)
    assert violations[0][0] == "page_token"


def test_request_id_makes_mutations_happen_once(stubs: Stubs) -> None:
    request = assistant_pb2.CreateAssistantRequest(name="once", request_id="req-assistant-1")
    first = stubs.assistants.Create(request)
    second = stubs.assistants.Create(request)
    assert first == second
    thread = stubs.threads.Create(thread_pb2.CreateThreadRequest(request_id="req-thread-1"))
    assert stubs.threads.Create(thread_pb2.CreateThreadRequest(request_id="req-thread-1")).id == thread.id
    message = message_pb2.CreateMessageRequest(thread_id=thread.id, text="hi", request_id="req-msg-1")
    assert stubs.messages.Create(message).id == stubs.messages.Create(message).id
    assert len(stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=thread.id)).messages) == 1
    with pytest.raises(grpc.RpcError) as reused:
        stubs.assistants.Create(
            assistant_pb2.CreateAssistantRequest(name="other", request_id="req-assistant-1")
        )
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, _ = error_details(reused.value)
    assert info is not None and info.reason == "REQUEST_ID_REUSED"
    # Deleting twice with one request_id answers OK twice; without it the second is NOT_FOUND.
    delete = assistant_pb2.DeleteAssistantRequest(assistant_id=first.id, request_id="req-delete-1")
    stubs.assistants.Delete(delete)
    stubs.assistants.Delete(delete)
    with pytest.raises(grpc.RpcError) as gone:
        stubs.assistants.Delete(assistant_pb2.DeleteAssistantRequest(assistant_id=first.id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_request_id_on_create_run_survives_restart(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server()
    stubs = Stubs.connect(server.address)
    assistant = stubs.assistant(name="r")
    thread = stubs.thread("hi")
    first = stubs.run(assistant.id, thread.id, request_id="run-once")
    stubs.wait(first.id)
    stubs.close()
    server.stop()
    server.start()
    stubs = Stubs.connect(server.address)
    try:
        again = stubs.run(assistant.id, thread.id, request_id="run-once")
        assert again.id == first.id
        assert len(stubs.runs.List(run_pb2.ListRunsRequest(thread_id=thread.id)).runs) == 1
    finally:
        stubs.close()


def test_labels_at_the_limits_are_accepted(stubs: Stubs) -> None:
    labels = {f"k{i:02d}" + "x" * 60: "v" * 512 for i in range(16)}
    assistant = stubs.assistant(name="labels", labels=labels)
    assert dict(assistant.labels) == labels


def test_a_message_is_stored_as_given_by_text_or_by_parts(stubs: Stubs) -> None:
    """Create builds the message field by field (a text's part in place, the timestamp's
    seconds and nanos set directly): what it answers is what Get and List read back."""
    thread = stubs.threads.Create(
        thread_pb2.CreateThreadRequest(messages=[message_pb2.MessageInput(text="first", labels={"k": "v"})])
    )
    by_text = stubs.messages.Create(message_pb2.CreateMessageRequest(thread_id=thread.id, text="second"))
    by_parts = stubs.messages.Create(
        message_pb2.CreateMessageRequest(
            thread_id=thread.id,
            role=message_pb2.ASSISTANT,
            content=[
                message_pb2.ContentPart(text=message_pb2.TextPart(text="a")),
                message_pb2.ContentPart(text=message_pb2.TextPart(text="b")),
            ],
        )
    )
    text_part = message_pb2.ContentPart(text=message_pb2.TextPart(text="second"))
    assert list(by_text.content) == [text_part] and by_text.role == message_pb2.USER
    assert dict(by_text.labels) == {} and by_text.thread_id == thread.id
    assert [p.text.text for p in by_parts.content] == ["a", "b"] and by_parts.role == message_pb2.ASSISTANT
    for message in (by_text, by_parts):
        assert stubs.messages.Get(message_pb2.GetMessageRequest(message_id=message.id)) == message
        # A valid Timestamp (nanos below a second), from the server's clock as the thread's is.
        assert 0 <= message.created_at.nanos < 1_000_000_000
        assert abs(message.created_at.seconds - thread.created_at.seconds) < 86_400
    listed = stubs.messages.List(message_pb2.ListMessagesRequest(thread_id=thread.id, order=common_pb2.ASC))
    assert [m.content[0].text.text for m in listed.messages] == ["first", "second", "a"]
    assert dict(listed.messages[0].labels) == {"k": "v"} and listed.messages[1:] == [by_text, by_parts]
