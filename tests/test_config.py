"""Configuration by flags and SPINDLE_* variables, `--help`, and the access log."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from spindle.v1 import run_pb2
from spindle_server.config import build_parser, parse_config
from support.server import ServerProcess
from support.stubs import Stubs


def test_every_flag_has_help_and_the_help_names_the_environment() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "spindle_server", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "SPINDLE_<FLAG>" in help_text
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
        for flag in action.option_strings:
            assert flag in help_text


def test_environment_fills_flags_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINDLE_PORT", "6001")
    monkeypatch.setenv("SPINDLE_TOOL_TIMEOUT", "12.5")
    monkeypatch.setenv("SPINDLE_API_KEYS", "k1=p1,k2=p2")
    config = parse_config([])
    assert config.port == 6001 and config.engine.tool_timeout == 12.5
    assert config.api_keys == {"k1": "p1", "k2": "p2"}
    assert parse_config(["--port", "6002"]).port == 6002


@pytest.mark.parametrize(
    "argv",
    [
        ["--api-key", "no-project"],
        ["--tls-cert", "cert.pem"],
        ["--log-format", "xml"],
        ["--max-concurrent-runs", "0"],
        ["--tool-timeout", "-1"],
        ["--provider", "bad name=http://x"],
        ["--default-model", "nowhere/model"],
        ["--host", "0.0.0.0"],
    ],
)
def test_bad_configuration_is_refused_at_start(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config(argv)
    assert exited.value.code == 2


def test_access_log_names_method_code_latency_and_run(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server("--log-level", "debug")
    stubs = Stubs.connect(server.address)
    try:
        run = stubs.start("log me")
        stubs.wait(run.id)
        with pytest.raises(grpc.RpcError):
            stubs.runs.Get(run_pb2.GetRunRequest(run_id="run_missing0000"))
    finally:
        stubs.close()
    create = server.wait_for_log(lambda e: e.get("method") == "/spindle.v1.RunService/Create")
    assert create["code"] == "OK" and create["run_id"] == run.id and create["level"] == "debug"
    assert isinstance(create["latency_ms"], float) and create["request_id"]
    missing = server.wait_for_log(lambda e: e.get("event") == "rpc" and e.get("code") == "NOT_FOUND")
    assert missing["level"] == "info" and missing["reason"] == "RUN_NOT_FOUND"


def test_a_taken_port_is_a_clear_error(server: ServerProcess, tmp_path: Path) -> None:
    taken = subprocess.run(
        [
            sys.executable,
            "-m",
            "spindle_server",
            "--port",
            str(server.port),
            "--database",
            str(tmp_path / "x.db"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert taken.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}" in taken.stderr
    assert "Traceback" not in taken.stderr
