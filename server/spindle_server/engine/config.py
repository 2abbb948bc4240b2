"""Engine settings (the server's flags fill them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_concurrent_runs: int = 64
    lease_seconds: float = 30.0  # an executor that stops renewing loses its run after this
    tool_timeout: float = 600.0  # TOOL_CALLS -> EXPIRED after this
    run_timeout: float = 3600.0  # the whole run -> EXPIRED after this
    sweep_interval: float = 0.5  # how often deadlines and orphaned leases are checked
    coalesce_window: float = 0.005  # deltas arriving within this many seconds share one event
    max_attempts: int = 3  # model attempts of one run across crashes before it fails
    idle_poll_interval: float = 1.0  # claim loop re-check without a wake-up (other replicas)
    request_id_ttl: float = 24 * 3600.0  # a repeated request_id is recognised for this long
    # This replica's identity, stable across its restarts if given (--replica-id): a restarted
    # replica takes its previous incarnation's runs at once instead of waiting out their leases.
    # None: a random one per process (a dead process's runs wait for their leases to run out).
    replica_id: str | None = None
