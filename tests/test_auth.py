"""API keys map callers to projects; every resource is invisible to other projects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spindle.v1 import assistant_pb2, run_pb2
from support.stubs import Stubs, error_details


def test_projects_are_isolated(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--api-key", "key-alpha=alpha", "--api-key", "key-beta=beta")
    alpha = Stubs.connect(server.address, "key-alpha")
    beta = Stubs.connect(server.address, "key-beta")
    anonymous = Stubs.connect(server.address)
    wrong = Stubs.connect(server.address, "key-gamma")
    try:
        run = alpha.start("secret plans")
        assert alpha.wait(run.id).status == run_pb2.COMPLETED
        for call, request in (
            (beta.runs.Get, run_pb2.GetRunRequest(run_id=run.id)),
            (beta.assistants.Get, assistant_pb2.GetAssistantRequest(assistant_id=run.assistant_id)),
            (beta.runs.Cancel, run_pb2.CancelRunRequest(run_id=run.id)),
        ):
            with pytest.raises(grpc.RpcError) as hidden:
                call(request)
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as hidden_stream:
            beta.events(run.id)
        assert hidden_stream.value.code() == grpc.StatusCode.NOT_FOUND
        assert list(beta.runs.List(run_pb2.ListRunsRequest()).runs) == []
        assert [r.id for r in alpha.runs.List(run_pb2.ListRunsRequest()).runs] == [run.id]

        for stubs, reason in ((anonymous, "MISSING_API_KEY"), (wrong, "INVALID_API_KEY")):
            with pytest.raises(grpc.RpcError) as refused:
                stubs.runs.Get(run_pb2.GetRunRequest(run_id=run.id))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info, _ = error_details(refused.value)
            assert info is not None and info.reason == reason
        # Health needs no key (load balancers probe it).
        health = health_pb2_grpc.HealthStub(anonymous.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for stubs in (alpha, beta, anonymous, wrong):
            stubs.close()


def test_listening_beyond_localhost_needs_keys(tmp_path: Path) -> None:
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "spindle_server",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--database",
            str(tmp_path / "x.db"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2
    assert "--api-key" in refused.stderr
