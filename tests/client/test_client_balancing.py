"""Several replicas from the client: addresses or a DNS name, balanced with gRPC's round_robin.

On the SQLite pass each replica has a file of its own, so the calls here are ones whose answer does
not depend on shared state (AssistantService.Create); on the PostgreSQL pass the replicas share one
database, and one run's calls are followed from replica to replica. Which replica answered is read
from its access log.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import spindle
from spindle._channel import TARGET_ENV, Settings
from spindle._targets import ROUND_ROBIN
from spindle.cli import main
from support import certs
from support.replicas import (
    calls,
    calls_per_replica,
    for_store_under_test,
    replicas,
    served_counts,
    who_served,
)
from support.server import Databases, ServerProcess, store_under_test

STORE = store_under_test()
CREATE = "/spindle.v1.AssistantService/Create"
GET_ASSISTANT = "/spindle.v1.AssistantService/Get"
LISTEN = "/spindle.v1.RunService/ListenBatches"  # what the client follows a run with
SUBMIT = "/spindle.v1.RunService/SubmitToolResults"
GET_RUN = "/spindle.v1.RunService/Get"
WARM_UP_BOUND = 300  # calls; round_robin reaches every replica long before


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, databases: Databases) -> Iterator[list[ServerProcess]]:
    directory = tmp_path_factory.mktemp("replicas")
    with replicas(
        for_store_under_test(directory, databases), extra_args=["--tool-timeout", "600"]
    ) as started:
        yield started


def addresses(servers: list[ServerProcess]) -> list[str]:
    return [server.address for server in servers]


def settings(target: str | list[str], **options: object) -> Settings:
    return Settings.resolve(
        target,
        None,
        tls=None,
        root_certificates=None,
        timeout=10,
        retry=None,
        channel_options=list(options.items()),
        interceptors=(),
    )


def counts(servers: list[ServerProcess]) -> list[int]:
    return [calls(server, CREATE) for server in servers]


def reach_every_replica(create: Callable[[str], object], servers: list[ServerProcess]) -> None:
    """Call until every replica has answered once: round_robin only picks connected replicas, and
    they connect in their own time. A single-address channel would never get there."""
    made = sum(counts(servers))  # every call before this one is logged (spread() waited for it)
    for i in range(WARM_UP_BOUND):
        create(f"warm{i}")
        if min(calls_per_replica(servers, CREATE, made + i + 1)) > 0:
            return
    raise AssertionError(f"calls never reached every replica: {counts(servers)}")


def spread(servers: list[ServerProcess], before: list[int], made: int) -> list[int]:
    after = calls_per_replica(servers, CREATE, sum(before) + made)
    return [a - b for a, b in zip(after, before, strict=True)]


# ---- what grpc is given ------------------------------------------------------------------


def test_one_address_goes_to_grpc_as_before() -> None:
    target, options = settings("127.0.0.1:50051").channel()
    assert target == "127.0.0.1:50051"
    names = {name for name, _ in options}
    assert "grpc.service_config" not in names and "grpc.default_authority" not in names


def test_several_addresses_become_a_static_list_with_round_robin() -> None:
    for given in ("127.0.0.1:1,127.0.0.2:2", ["127.0.0.1:1", "127.0.0.2:2"], " 127.0.0.1:1 , 127.0.0.2:2 "):
        target, options = settings(given).channel()
        assert target == "ipv4:127.0.0.1:1,127.0.0.2:2"
        assert ("grpc.service_config", ROUND_ROBIN) in options
        assert ("grpc.default_authority", "127.0.0.1:1") in options
    assert settings("[::1]:1,[::1]:2").channel()[0] == "ipv6:[::1]:1,[::1]:2"
    # A name is looked up once (localhost is 127.0.0.1 everywhere); its IPv4 addresses are used.
    target, options = settings("localhost:7,127.0.0.1:8").channel()
    assert target.startswith("ipv4:") and "127.0.0.1:7" in target and target.endswith("127.0.0.1:8")
    assert ("grpc.default_authority", "localhost:7") in options  # what TLS checks the certificate for


def test_resolver_targets_balance_and_the_callers_policy_wins() -> None:
    for given in ("dns:///localhost:1", "ipv4:127.0.0.1:1,127.0.0.1:2"):
        target, options = settings(given).channel()
        assert target == given and ("grpc.service_config", ROUND_ROBIN) in options
    _, options = settings("127.0.0.1:1,127.0.0.1:2", **{"grpc.lb_policy_name": "pick_first"}).channel()
    assert [value for name, value in options if name in ("grpc.lb_policy_name", "grpc.service_config")] == [
        "pick_first"
    ]


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:1,[::1]:2", "127.0.0.1:1,127.0.0.1", "127.0.0.1:1,:2", "127.0.0.1:1,,127.0.0.1:2"],
)
def test_bad_address_lists_are_refused(target: str) -> None:
    with pytest.raises(ValueError):
        spindle.Client(target)
    with pytest.raises(ValueError):
        spindle.Client(target.split(","))


def test_a_name_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot resolve"):
        spindle.Client("127.0.0.1:1,no-such-host.invalid:2")


# ---- against three real replicas ---------------------------------------------------------


def test_client_calls_spread_over_three_replicas(servers: list[ServerProcess]) -> None:
    with spindle.Client(addresses(servers), timeout=20) as client:
        reach_every_replica(lambda name: client.assistants.create(name=name), servers)
        before = counts(servers)
        for i in range(30):
            client.assistants.create(name=f"a{i}")
    per_replica = spread(servers, before, 30)
    assert sum(per_replica) == 30 and min(per_replica) >= 5, per_replica  # round robin: 10 each


def test_async_client_calls_spread_over_three_replicas(servers: list[ServerProcess]) -> None:
    async def scenario() -> list[int]:
        async with spindle.AsyncClient(",".join(addresses(servers)), timeout=20) as client:
            made = sum(counts(servers))
            for i in range(WARM_UP_BOUND):
                await client.assistants.create(name=f"warm{i}")
                if min(calls_per_replica(servers, CREATE, made + i + 1)) > 0:
                    break
            before = counts(servers)
            await asyncio.gather(*(client.assistants.create(name=f"a{i}") for i in range(30)))
            return spread(servers, before, 30)

    per_replica = asyncio.run(scenario())
    assert sum(per_replica) == 30 and min(per_replica) > 0, per_replica


def test_dns_name_with_round_robin(servers: list[ServerProcess]) -> None:
    """`localhost` resolves to 127.0.0.1 (and on some machines ::1 too, where nothing listens:
    round_robin leaves that address out while it cannot connect)."""
    target = f"dns:///localhost:{servers[0].port}"
    before = counts(servers)
    with spindle.Client(target, timeout=20) as client:
        assert client.target == target
        for i in range(5):
            client.assistants.create(name=f"dns{i}")
    assert spread(servers, before, 5) == [5, 0, 0]


def cli(*argv: str, env_target: str | None = None, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    if env_target is not None:
        monkeypatch.setenv(TARGET_ENV, env_target)
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--json", "assistants", "create", "--name", "from-cli"], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    answer: dict[str, object] = json.loads(out.getvalue())
    return answer


def test_cli_with_several_targets(servers: list[ServerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    before = counts(servers)
    assert cli("--target", ",".join(addresses(servers)), monkeypatch=monkeypatch)["name"] == "from-cli"
    assert cli(env_target=",".join(addresses(servers)), monkeypatch=monkeypatch)["name"] == "from-cli"
    assert sum(spread(servers, before, 2)) == 2


def test_cli_refuses_a_bad_target_list(monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["--target", "127.0.0.1:1,[::1]:2", "threads", "create"], stdout=out, stderr=err) == 2
    assert "IPv4" in err.getvalue()


def test_a_killed_replica_is_skipped(
    tmp_path: Path, databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        replicas(for_store_under_test(tmp_path, databases)) as servers,
        spindle.Client(addresses(servers), timeout=30) as client,
    ):
        reach_every_replica(lambda name: client.assistants.create(name=name), servers)
        servers[1].kill()
        survivors = [servers[0], servers[2]]
        before = counts(survivors)
        # A call that meets the dead replica before grpc notices gets UNAVAILABLE and is retried:
        # round_robin then picks a live one. Every call succeeds.
        for i in range(30):
            client.assistants.create(name=f"after{i}")
        per_replica = spread(survivors, before, 30)
        assert sum(per_replica) == 30 and min(per_replica) > 0, per_replica
        # The CLI with the dead replica first in its list.
        dead_first = [servers[1].address, *addresses(survivors)]
        assert cli("--target", ",".join(dead_first), monkeypatch=monkeypatch)["name"] == "from-cli"


@pytest.mark.skipif(not certs.openssl_available(), reason="openssl is needed to make test certificates")
def test_tls_over_several_replicas_checks_the_name_given(tmp_path: Path, databases: Databases) -> None:
    """The first address's host is the name the certificate is checked for (the certificate is
    for localhost and 127.0.0.1), whatever the list resolves to."""
    ca = certs.make_ca(tmp_path, "ca")
    leaf = certs.issue(ca, tmp_path, "server", server=True)
    tls = ["--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key)]
    with replicas(for_store_under_test(tmp_path, databases), count=2, extra_args=tls) as servers:
        target = ",".join(f"localhost:{server.port}" for server in servers)
        with spindle.Client(target, root_certificates=ca.cert.read_bytes(), timeout=20) as client:
            reach_every_replica(lambda name: client.assistants.create(name=name), servers)


# ---- one shared database (PostgreSQL): one run's calls on different replicas -------------------


def land_on(client: spindle.Client, servers: list[ServerProcess], target: int) -> None:
    """Call until servers[target] answers one (read from the logs, not assumed): round_robin
    then picks the next replica for the next call."""
    assistant = client.assistants.create(name="steering")
    for _ in range(3 * len(servers)):
        before = [calls(server, GET_ASSISTANT) for server in servers]
        client.assistants.get(assistant.id)
        after = calls_per_replica(servers, GET_ASSISTANT, sum(before) + 1)
        if after[target] > before[target]:
            return
    raise AssertionError(f"round_robin never sent a call to replica {target}")


@pytest.mark.skipif(STORE != "postgresql", reason="replicas share a database on PostgreSQL")
def test_one_run_across_three_replicas_with_round_robin(servers: list[ServerProcess]) -> None:
    """Created, listened to, its tool results submitted and read back, each call answered by
    whichever replica round_robin picks: ListenBatches and SubmitToolResults by different ones."""
    schema = {"type": "object", "properties": {}}
    with spindle.Client(addresses(servers), timeout=20) as client:
        reach_every_replica(lambda name: client.assistants.create(name=name), servers)
        assistant = client.assistants.create(name="tools", tools=[spindle.FunctionTool("lookup", "", schema)])
        thread = client.threads.create(messages=["/tool lookup {}"])
        land_on(client, servers, 0)
        run = client.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        before_listen = served_counts(servers, LISTEN, run.id)
        before_submit = served_counts(servers, SUBMIT, run.id)
        indexes: list[int] = []
        for event in run.listen(timeout=60):
            indexes.append(event.index)
            if event.tool_calls:
                client.runs.submit_tool_results(run.id, {event.tool_calls[0].id: "42"})
        listened_on = who_served(servers, LISTEN, run.id, before_listen)
        submitted_on = who_served(servers, SUBMIT, run.id, before_submit)
        assert listened_on != submitted_on
        assert indexes == list(range(len(indexes)))
        before_get = served_counts(servers, GET_RUN, run.id)
        for _ in servers:  # three in a row: one on each replica
            assert client.runs.get(run.id).status is spindle.RunStatus.COMPLETED
        per_replica = [0] * len(servers)
        for _ in range(1000):  # their log lines come through pipes (bounded wait)
            now = served_counts(servers, GET_RUN, run.id)
            per_replica = [after - then for after, then in zip(now, before_get, strict=True)]
            if sum(per_replica) >= len(servers):
                break
            time.sleep(0.02)
        assert per_replica == [1, 1, 1]
