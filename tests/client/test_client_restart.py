"""Resuming across a server restart: listen reconnects from the last index + 1, wait and calls go on.

The server is a dedicated one on a fixed port; it is stopped (SIGTERM, short grace period: it
re-queues the run it was executing, voiding the partial reply) and started again on the same
database while the client is in the middle of a `/sleep` run.
"""

from __future__ import annotations

import time

from client_support import Restarter

import spindle

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
        assert client.threads.get(thread.id).id == thread.id  # retried on UNAVAILABLE until back


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
