"""Streaming: print the reply word by word as the model writes it.

python examples/streaming.py   (SPINDLE_TARGET defaults to localhost:50051)
"""

import os

import spindle

target = os.environ.get("SPINDLE_TARGET", "localhost:50051")

with spindle.Client(target) as client:
    assistant = client.assistants.create(name="streamer")
    # The builtin model streams its reply over about a second with `/sleep 1`.
    thread = client.threads.create(messages=["/sleep 1\nTell me a story about a spindle."])
    run = client.runs.create(thread_id=thread.id, assistant_id=assistant.id)

    # listen() yields every event with its index; it resumes by itself if the connection drops.
    for event in run.listen(timeout=60):
        if event.discard_partial_message:
            print("\n[the server retried the model: the text since its last tool calls is void]")
        if event.delta:
            print(event.delta, end="", flush=True)
        if event.is_terminal:
            print(f"\n[{event.status_name}]")
