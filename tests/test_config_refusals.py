"""Configuration values that would start a server that cannot work are refused."""

from __future__ import annotations

import pytest

from spindle_server.config import parse_config


@pytest.mark.parametrize(
    "argv",
    [
        # A bare provider names no model: every Create without a model would be INVALID_ARGUMENT.
        ["--provider", "local=http://127.0.0.1:9/v1", "--default-model", "local"],
        ["--default-model", "builtin/x"],
        # NaN passes "must be positive" (nan <= 0 is False) and disables deadlines and leases.
        ["--tool-timeout", "nan"],
        ["--run-timeout", "inf"],
        ["--lease-seconds", "nan"],
        ["--grace-period", "nan"],
        ["--grace-period", "-1"],
        ["--coalesce-ms", "nan"],
        # The separator of a lease owner's replica and incarnation; an empty id would match all.
        ["--replica-id", "a/b"],
        ["--replica-id", ""],
    ],
)
def test_unusable_configuration_is_refused_at_start(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config(argv)
    assert exited.value.code == 2


def test_a_replica_id_is_kept_and_none_means_random_per_process() -> None:
    assert parse_config(["--replica-id", "spindle-0.eu:1"]).engine.replica_id == "spindle-0.eu:1"
    assert parse_config([]).engine.replica_id is None


def test_a_provider_model_as_default_is_accepted() -> None:
    config = parse_config(["--provider", "local=http://127.0.0.1:9/v1", "--default-model", "local/llama"])
    assert config.default_model == "local/llama"
