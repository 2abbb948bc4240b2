"""Configuration values that would start a server that cannot work are refused."""

from __future__ import annotations

import gc

import pytest

from spindle_server.config import parse_config
from spindle_server.server import tune_collector


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
        ["--gc-threshold", "-1"],
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


def test_the_collector_runs_every_gc_threshold_allocations_and_start_up_is_frozen() -> None:
    assert parse_config([]).gc_threshold == 50_000
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        tune_collector(parse_config(["--gc-threshold", "12345"]).gc_threshold)
        assert gc.get_threshold() == (12345, *before[1:])
        assert gc.get_freeze_count() > frozen
        tune_collector(0)  # Python's own threshold is left as it is
        assert gc.get_threshold() == (12345, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
