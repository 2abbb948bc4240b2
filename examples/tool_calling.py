"""Tool calling: the model asks for two cities' weather; our function answers both, in parallel.

python examples/tool_calling.py   (SPINDLE_TARGET defaults to localhost:50051)
"""

import os

import spindle

target = os.environ.get("SPINDLE_TARGET", "localhost:50051")


def get_weather(city: str, unit: str = "celsius") -> dict[str, object]:
    """Get the current weather in a city."""
    return {"city": city, "temperature": 21, "unit": unit, "sky": "clear"}


with spindle.Client(target) as client:
    # The function's name, docstring and signature become the tool's declaration.
    assistant = client.assistants.create(name="weather", tools=[get_weather])

    # The builtin model calls tools on `/tool NAME {json}` lines (two lines: two parallel calls).
    thread = client.threads.create(
        messages=['/tool get_weather {"city": "Paris"}\n/tool get_weather {"city": "Tokyo"}']
    )

    # Runs until the end, answering every TOOL_CALLS pause with get_weather.
    result = client.runs.create_and_run(thread_id=thread.id, assistant_id=assistant.id, tools=[get_weather])
    print(result.status_name)
    print(result.text)

    # The same by hand, OpenAI style: poll, answer the pause, poll again.
    thread = client.threads.create(messages=['/tool get_weather {"city": "Oslo"}'])
    run = client.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    while run.status is spindle.RunStatus.TOOL_CALLS:
        outputs = {call.id: get_weather(**call.parse_arguments()) for call in run.required_tool_calls}
        run = client.runs.submit_tool_results_and_poll(run.id, outputs)
    print(run.status.name)
    print(run.reply.text if run.reply else "")
