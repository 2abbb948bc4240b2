"""SPINDLE_* variables go through the same type checks as their flags: a bad value is a
one-line usage error naming the variable (exit 2), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spindle_server.config import parse_config


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SPINDLE_PORT", "x"),
        ("SPINDLE_PORT", ""),
        ("SPINDLE_TOOL_TIMEOUT", "soon"),
        ("SPINDLE_MAX_MESSAGE_BYTES", "8MiB"),
        ("SPINDLE_ALLOW_UNAUTHENTICATED_REMOTE", "maybe"),
    ],
)
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(variable: str, value: str) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SPINDLE_")}
    started = subprocess.run(
        [sys.executable, "-m", "spindle_server"],
        env=environment | {variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert started.returncode == 2, started.stderr
    assert "Traceback" not in started.stderr
    [line] = started.stderr.splitlines()
    assert line.startswith("spindle-server: error: ") and f"{variable}={value!r}" in line


def test_a_flag_wins_over_a_bad_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINDLE_PORT", "x")
    assert parse_config(["--port", "6003"]).port == 6003


@pytest.mark.parametrize(("value", "allowed"), [("yes", True), ("On", True), ("0", False), ("", False)])
def test_switches_read_the_usual_words(monkeypatch: pytest.MonkeyPatch, value: str, allowed: bool) -> None:
    monkeypatch.setenv("SPINDLE_ALLOW_UNAUTHENTICATED_REMOTE", value)
    assert parse_config([]).allow_unauthenticated_remote is allowed
