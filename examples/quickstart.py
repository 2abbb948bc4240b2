"""Quickstart: an assistant, a thread, a run, and its reply.

Start a server first (`make serve`), then: python examples/quickstart.py
The server address comes from SPINDLE_TARGET (default localhost:50051).
"""

import os

import spindle

target = os.environ.get("SPINDLE_TARGET", "localhost:50051")

with spindle.Client(target) as client:
    assistant = client.assistants.create(name="helper", instructions="Answer briefly.")
    thread = client.threads.create(messages=["Hello, Spindle!"])

    run = client.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    result = run.wait(timeout=60)  # rides the event stream; raises RunTimeoutError after 60 s

    if result.is_succeeded:
        print(result.text)
    else:
        print(f"run {run.id} ended {result.status_name}: {result.error}")
