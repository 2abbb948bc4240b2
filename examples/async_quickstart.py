"""The async client: the same surface, awaited. `await run` waits; `async for` listens.

python examples/async_quickstart.py   (SPINDLE_TARGET defaults to localhost:50051)
"""

import asyncio
import os

import spindle


async def get_time(city: str) -> str:
    """The local time in a city."""
    await asyncio.sleep(0.01)
    return f"12:00 in {city}"


async def main() -> None:
    target = os.environ.get("SPINDLE_TARGET", "localhost:50051")
    async with spindle.AsyncClient(target) as client:
        assistant = await client.assistants.create(name="async-helper", tools=[get_time])

        thread = await client.threads.create(messages=["Hello from asyncio!"])
        run = await client.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        result = await run  # the same as: await run.wait(timeout=60)
        print(result.text)

        thread = await client.threads.create(messages=["/sleep 0.5\nStream this, please."])
        run = await client.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        async for event in run:
            if event.delta:
                print(event.delta, end="", flush=True)
        print()

        thread = await client.threads.create(messages=['/tool get_time {"city": "Lima"}'])
        result = await client.runs.create_and_run(
            thread_id=thread.id, assistant_id=assistant.id, tools={"get_time": get_time}
        )
        print(result.text)


if __name__ == "__main__":
    asyncio.run(main())
