"""Fixtures for the client's tests: real servers (tests/support), real stubs, no mocks.

`client`/`aclient` talk to the shared session server; `restartable` gives a dedicated server on a
port held for it (HeldPort), so it can be stopped and started again under a connected client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import pytest_asyncio
from client_support import HeldPort, Restarter

import spindle
from support.server import ServerProcess

WEATHER_TOOLS = ("get_weather", "get_time")


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[spindle.Client]:
    with spindle.Client(server.address, timeout=20) as connected:
        yield connected


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def aclient(server: ServerProcess) -> AsyncIterator[spindle.AsyncClient]:
    async with spindle.AsyncClient(server.address, timeout=20) as connected:
        yield connected


@pytest.fixture(scope="session")
def echo(client: spindle.Client) -> spindle.Assistant:
    """An assistant of the builtin model without tools."""
    return client.assistants.create(name="echo")


@pytest.fixture(scope="session")
def weather(client: spindle.Client) -> spindle.Assistant:
    """An assistant with the function tools get_weather(city) and get_time(city)."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [spindle.FunctionTool(name, f"{name} of a city", schema) for name in WEATHER_TOOLS]
    return client.assistants.create(name="weather", tools=tools)


@pytest.fixture
def restartable(make_server: Callable[..., ServerProcess]) -> Iterator[Restarter]:
    """A dedicated server on a held port that comes back on the same address after a restart.

    A short grace period makes a stop quick; the server then re-queues the run it was executing.
    Restarts run in the background; teardown waits for them before make_server kills the server,
    so a failing test never leaves a server started behind its back.
    """
    with HeldPort() as port:  # ours across restarts, not another process's (HeldPort)
        restarter = Restarter(make_server("--port", str(port.port), "--grace-period", "0.3"))
        yield restarter
        restarter.join()
