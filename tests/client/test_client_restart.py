"""Resuming across a server restart: listen reconnects from the last index + 1, wait and calls go on.

The server is a dedicated one on a port held for it (HeldPort); it is stopped (SIGTERM, short grace period: it
re-queues the run it was executing, voiding the partial reply) and started again on the same
database while the client is in the middle of a `/sleep` run.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from client_support import HeldPort, Restarter

import spindle
from fake_openai import (
    FakeOpenAI,
    StreamReply,
    finish_chunk,
    role_chunk,
    text_chunk,
    text_stream,
    tool_call_chunk,
    usage_chunk,
)
from support.server import ServerProcess

SLOW = "/sleep 1.2\none two three four five six seven eight nine ten"
REPLY = "You said: " + SLOW


def check_stream(events: list[spindle.RunEvent]) -> None:
    """No gap, no duplicate, the partial reply voided once, the right text at the end."""
    assert [e.index for e in events] == list(range(len(events)))
    assert any(e.discard_partial_message for e in events), "the restart re-queued the run"
    last = events[-1]
    assert last.type is spindle.EventType.DONE and last.is_terminal
    assert last.text == REPLY and last.message is not None and last.message.text == REPLY


def test_listen_resumes_across_a_restart(restartable: Restarter) -> None:
    with spindle.Client(restartable.address, timeout=10) as client:
        assistant = client.assistants.create(name="restart")
        thread = client.threads.create(messages=[SLOW])
        run = client.runs.create(thread_id=thread, assistant_id=assistant)
        events: list[spindle.RunEvent] = []
        restarted = False
        for event in run.listen(timeout=60):
            events.append(event)
            if not restarted and event.type is spindle.EventType.PARTIAL_MESSAGE and len(events) >= 4:
                restartable.restart()
                restarted = True
        assert restarted
        check_stream(events)
        assert run.status is spindle.RunStatus.COMPLETED


def test_wait_and_calls_survive_a_restart(restartable: Restarter) -> None:
    with spindle.Client(restartable.address, timeout=10) as client:
        assistant = client.assistants.create(name="restart")
        thread = client.threads.create(messages=[SLOW])
        run = client.runs.create(thread_id=thread, assistant_id=assistant)
        time.sleep(0.5)  # let the reply start streaming
        restartable.restart()
        result = run.wait(timeout=60, poll_interval=0.05)
        assert result.is_succeeded and result.text == REPLY
        restartable.join()
        down = restartable.restart(down_for=0.3)
        assert down.wait(timeout=30)
        # Retried on UNAVAILABLE until the server is back; the bound is how long a start-up may
        # take on a loaded machine, not the client's default deadline.
        assert client.threads.get(thread.id, timeout=120).id == thread.id


def test_the_port_stays_ours_while_the_server_is_down(restartable: Restarter) -> None:
    """No other process can take the restarted server's port while it is down (another test's
    server there would answer our client: a Get of our run NOT_FOUND), and the server listens
    there again. An explicit bind stands for any other process's; binding port 0 is refused
    that port too, by the same rule."""
    host, port = restartable.address.rsplit(":", 1)
    restartable.server.stop()
    with socket.socket() as other, pytest.raises(OSError) as refused:
        other.bind((host, int(port)))
    assert refused.value.errno == errno.EADDRINUSE
    with spindle.Client(restartable.address) as client, pytest.raises(spindle.Unavailable):
        client.threads.get("thread_x", timeout=1.0)  # refused while down, as for a free port
    restartable.server.start()
    assert restartable.address == f"{host}:{port}"
    with spindle.Client(restartable.address, timeout=10) as client:
        assert client.threads.get(client.threads.create().id).id


def test_a_failed_restart_is_reported_by_join(make_server: Callable[..., ServerProcess]) -> None:
    """A restart that could not listen again fails the test that joins it, rather than leaving
    its client to meet whatever answers on that port."""
    with HeldPort() as held:
        restarter = Restarter(make_server("--port", str(held.port), "--grace-period", "0.3"))
        restarter.server.stop()
        with socket.socket() as squatter:  # the one way to take a held port: listen with SO_REUSEADDR
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", held.port))
            squatter.listen()
            restarter.restart(down_for=0).wait(timeout=30)
            with pytest.raises(RuntimeError, match="a restart of the server failed"):
                restarter.join()


async def test_async_listen_resumes_across_a_restart(restartable: Restarter) -> None:
    async with spindle.AsyncClient(restartable.address, timeout=10) as client:
        assistant = await client.assistants.create(name="restart")
        thread = await client.threads.create(messages=[SLOW])
        run = await client.runs.create(thread_id=thread, assistant_id=assistant)
        events: list[spindle.RunEvent] = []
        restarted = False
        async for event in run.listen(timeout=60):
            events.append(event)
            if not restarted and event.type is spindle.EventType.PARTIAL_MESSAGE and len(events) >= 4:
                restartable.restart()
                restarted = True
        assert restarted
        check_stream(events)
        assert (await run).is_succeeded


# ---- a retried turn voids only its own text --------------------------------------------------


@pytest.fixture
def provider() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def test_a_restart_after_tool_calls_voids_only_the_text_of_the_retried_turn(
    make_server: Callable[..., ServerProcess], provider: FakeOpenAI
) -> None:
    """`discard_partial_message` voids the text since the last TOOL_CALLS event, not the whole reply.

    The provider says "Let me check. " and calls get_weather; after the result it starts "The
    weather " and stalls; the server restarts (re-queues the turn, voiding that piece); the retried
    turn says "It is sunny.". The reply is "Let me check. It is sunny." and so is the text so far.
    """
    first_turn = StreamReply(
        [
            role_chunk(),
            text_chunk("Let me check. "),
            tool_call_chunk(0, call_id="call_1", name="get_weather"),
            tool_call_chunk(0, arguments='{"city": "Oslo"}'),
            finish_chunk("tool_calls"),
            usage_chunk(10, 5),
        ]
    )
    provider.enqueue(
        first_turn,
        text_stream("The weather ", "is", stall_after=2),  # role + "The weather ", then it hangs
        text_stream("It is ", "sunny."),
    )
    port = HeldPort()  # ours across the restart (HeldPort)
    restarter = Restarter(
        make_server(
            *("--port", str(port.port), "--grace-period", "0.3"),
            *("--provider", f"fake={provider.base_url},max_retries=0"),
            env={"SPINDLE_PROVIDER_FAKE_API_KEY": "sk-test"},
        )
    )
    try:
        with spindle.Client(restarter.address, timeout=10) as client:
            assistant = client.assistants.create(model="fake/gpt-test", tools=[get_weather])
            thread = client.threads.create(messages=["Weather in Oslo?"])
            run = client.runs.create(thread_id=thread, assistant_id=assistant)
            texts: list[str] = []
            events: list[spindle.RunEvent] = []
            paused = False

            def on_event(event: spindle.RunEvent) -> None:
                nonlocal paused
                events.append(event)
                if event.type is spindle.EventType.TOOL_CALLS:
                    paused = True
                elif paused and event.delta == "The weather ":
                    restarter.restart()

            result = run.stream(
                tools=[get_weather],
                on_event=on_event,
                on_text=lambda _, text: texts.append(text),
                timeout=60,
            )
    finally:
        try:
            restarter.join()
        finally:
            port.close()
    assert any(e.discard_partial_message for e in events), "the restart re-queued the turn"
    assert result.is_succeeded and result.text == "Let me check. It is sunny."
    assert events[-1].text == result.text and texts[-1] == result.text
    discard = next(e for e in events if e.discard_partial_message)
    assert discard.text == "Let me check. "  # the text before the tool calls stands


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"
