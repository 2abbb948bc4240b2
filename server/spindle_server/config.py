"""Server configuration: every flag has a SPINDLE_* environment variable of the same name.

Precedence: flag, then environment, then the built-in default (which runs everything embedded:
SQLite in ./data, the builtin model, 127.0.0.1:50051).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from spindle_server.engine.config import EngineConfig
from spindle_server.limits import Limits
from spindle_server.models.provider_spec import ProviderConfig, parse_provider_spec


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    database: Path = Path("data/spindle.db")  # the SQLite file, unless postgres_dsn is set
    postgres_dsn: str | None = None  # --database postgresql://...: the PostgreSQL store instead
    pg_pool_min: int = 2  # connections each replica keeps open to PostgreSQL
    pg_pool_max: int = 10  # connections each replica opens at most (plus one for LISTEN)
    default_model: str = "builtin"
    providers: tuple[ProviderConfig, ...] = ()
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> project
    allow_unauthenticated_remote: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    api_keys_file: Path | None = None  # `sha256:<hex> PROJECT` lines, re-read on SIGHUP (keys.py)
    tls_client_ca: Path | None = None  # PEM CA: require client certificates it signed (mutual TLS)
    grace_period: float = 10.0
    max_message_bytes: int = 8 * 1024 * 1024
    # grpc's defaults refuse a burst of new calls (1000 pending, 3000 hard: 16-40% of 10,000
    # Listen calls opened at once fail); 0 in these three means grpc's own default.
    grpc_max_concurrent_streams: int = 20_000  # HTTP/2 streams one connection may have open
    grpc_max_pending_requests: int = 20_000  # calls arrived, not yet taken up (hard limit: twice)
    grpc_max_pending_seconds: int = 120  # how long such a call may wait before grpc cancels it
    max_concurrent_rpcs: int = 0  # calls in progress at once, more: RESOURCE_EXHAUSTED (0: no limit)
    # Objects allocated between passes of the cyclic collector's youngest generation (0: Python's
    # own, 700 on 3.11-3.13, which under load with many streams runs a full pass every second).
    gc_threshold: int = 50_000
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    metrics_host: str | None = None  # None: the gRPC host
    # OpenAI Assistants v2 REST + SSE (compat/openai): None: off; 0: any free port.
    openai_port: int | None = None
    openai_host: str | None = None  # None: the gRPC host
    # Chosen by --openai-port auto: if that port is taken the API is off (a warning), not the start.
    openai_port_auto: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    retention: float | None = None  # seconds a finished run is kept; None: forever


REPLICA_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_DURATION = re.compile(r"^(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[smhd]?)$")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float | None:
    """'90', '90s', '15m', '12h', '7d' -> seconds; 'off' or '0' -> None (keep forever)."""
    text = text.strip().lower()
    if text in ("", "off", "none", "0"):
        return None
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 3600, 90s, 15m, 12h or 7d")
    seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"]]
    return seconds or None


def _env_name(name: str) -> str:
    return f"SPINDLE_{name.upper().replace('-', '_')}"


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_dsn(text: str) -> bool:
    return text.strip().lower().startswith(POSTGRES_SCHEMES)


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def describe_database(config: ServerConfig) -> str:
    return redact_dsn(config.postgres_dsn) if config.postgres_dsn else str(config.database)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(_env_name(name), default)


@dataclass(frozen=True, slots=True)
class _BadEnvironmentValue:
    """A flag's default from a SPINDLE_* variable that its type refused. Reported only if the
    flag itself is not given (the flag wins), as a usage error rather than a traceback."""

    variable: str
    value: str
    kind: str

    def __str__(self) -> str:
        return f"environment variable {self.variable}={self.value!r} is not a valid {self.kind}"


_KIND_NAMES: dict[type, str] = {int: "integer", float: "number"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _env_switch(name: str) -> bool | _BadEnvironmentValue:
    value = _env(name, "") or ""
    if value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    return _BadEnvironmentValue(_env_name(name), value, f"switch ({', '.join(_TRUE + _FALSE[1:])})")


def _refuse_bad_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for value in vars(args).values():
        if isinstance(value, _BadEnvironmentValue):
            parser.exit(2, f"{parser.prog}: error: {value}\n")


def is_local_host(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    engine = EngineConfig()
    parser = argparse.ArgumentParser(
        prog="spindle-server",
        description=(
            "Spindle: runs AI assistants on conversation threads over gRPC. "
            "Every flag can also be set by the environment variable SPINDLE_<FLAG> "
            "(upper case, dashes as underscores), e.g. SPINDLE_PORT=50052."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def option(flag: str, kind: type, default: object, help_text: str) -> None:
        env_value = _env(flag)
        value = default
        if env_value is not None:
            try:
                value = kind(env_value)
            except ValueError:
                value = _BadEnvironmentValue(_env_name(flag), env_value, _KIND_NAMES.get(kind, kind.__name__))
        parser.add_argument(f"--{flag}", type=kind, default=value, help=help_text)

    option(
        "host", str, defaults.host, "address to listen on; beyond localhost needs API keys or the flag below"
    )
    option("port", int, defaults.port, "port to listen on (0: any free port, printed at start)")
    option(
        "database",
        str,
        str(defaults.database),
        "SQLite database file (created with its folder), or a PostgreSQL DSN "
        "postgresql://USER[:PASSWORD]@HOST[:PORT]/DB for several replicas on one database",
    )
    option("pg-pool-min", int, defaults.pg_pool_min, "PostgreSQL connections kept open (with --database DSN)")
    option("pg-pool-max", int, defaults.pg_pool_max, "PostgreSQL connections at most (with --database DSN)")
    option("default-model", str, defaults.default_model, "model of assistants created without one")
    parser.add_argument(
        "--provider",
        action="append",
        default=[p for p in (_env("providers") or "").split(";") if p],
        help="an OpenAI-compatible model provider, NAME=BASE_URL[,option=value...] (repeatable; "
        "SPINDLE_PROVIDERS separates several with ';')",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[k for k in (_env("api_keys") or "").split(",") if k],
        metavar="KEY=PROJECT",
        help="accept 'authorization: Bearer KEY' for PROJECT, for local use only: a key on the "
        "command line is visible in the process list; use --api-keys-file elsewhere "
        "(repeatable; SPINDLE_API_KEYS separates several with ',')",
    )
    option(
        "api-keys-file",
        Path,
        None,
        "file of 'sha256:<hex> PROJECT' lines, re-read on SIGHUP; add keys with "
        "`spindle-server keys add --project P --file PATH`",
    )
    parser.add_argument(
        "--allow-unauthenticated-remote",
        action="store_true",
        default=_env_switch("allow_unauthenticated_remote"),
        help="listen beyond localhost without API keys (anyone who reaches the port can use it)",
    )
    option("tls-cert", Path, None, "PEM certificate chain: serve TLS (with --tls-key)")
    option("tls-key", Path, None, "PEM private key for --tls-cert")
    option("tls-client-ca", Path, None, "PEM CA certificates: require client certificates they signed")
    option("grace-period", float, defaults.grace_period, "seconds to finish calls and runs on SIGTERM")
    option("max-message-bytes", int, defaults.max_message_bytes, "largest gRPC message accepted or sent")
    option(
        "grpc-max-concurrent-streams",
        int,
        defaults.grpc_max_concurrent_streams,
        "HTTP/2 streams (calls) one client connection may have open at once (0: grpc's default)",
    )
    option(
        "grpc-max-pending-requests",
        int,
        defaults.grpc_max_pending_requests,
        "calls arrived but not yet started that grpc queues rather than refuses; the hard limit "
        "is twice this (0: grpc's default, 1000, which refuses bursts of new Listen calls)",
    )
    option(
        "grpc-max-pending-seconds",
        int,
        defaults.grpc_max_pending_seconds,
        "seconds a call may wait to be started before grpc cancels it (0: grpc's default, 30, "
        "which a busy server can exceed in a burst of new calls)",
    )
    option(
        "max-concurrent-rpcs",
        int,
        defaults.max_concurrent_rpcs,
        "calls in progress at once (Listen streams included); more are refused RESOURCE_EXHAUSTED "
        "(0: no limit)",
    )
    option(
        "gc-threshold",
        int,
        defaults.gc_threshold,
        "objects allocated between passes of Python's cyclic garbage collector (0: Python's "
        "own, 700 on 3.11-3.13, which under load with many open streams pauses the server for tens of ms "
        "about once a second)",
    )
    option("log-level", str, defaults.log_level, "debug | info | warning | error")
    option("log-format", str, defaults.log_format, "auto (JSON unless on a terminal) | json | console")
    option("max-concurrent-runs", int, engine.max_concurrent_runs, "runs executed at once by this server")
    option("tool-timeout", float, engine.tool_timeout, "seconds a run waits for tool results before EXPIRED")
    option("run-timeout", float, engine.run_timeout, "seconds a whole run may take before EXPIRED")
    option(
        "lease-seconds",
        float,
        engine.lease_seconds,
        "lease on an executing run; a dead server's runs recover after it",
    )
    option(
        "coalesce-ms", float, engine.coalesce_window * 1000, "text deltas within this many ms share one event"
    )
    option("max-attempts", int, engine.max_attempts, "model attempts of one run across crashes before FAILED")
    option(
        "replica-id",
        str,
        None,
        "this replica's identity among those on one PostgreSQL, kept across its restarts (unique "
        "among live replicas; letters, digits, . _ : -): a restarted replica takes over its own "
        "runs at once instead of after their lease. Default: random per process",
    )
    limits = Limits()
    option(
        "max-active-runs-per-project",
        int,
        limits.max_active_runs_per_project,
        "runs not yet finished at once in one project (more: RESOURCE_EXHAUSTED)",
    )
    option(
        "max-listen-streams-per-project",
        int,
        limits.max_listen_streams_per_project,
        "Listen streams open at once in one project on this server (more: RESOURCE_EXHAUSTED)",
    )
    option("max-tools", int, limits.max_tools, "function tools of one assistant or run")
    option("max-message-chars", int, limits.max_message_chars, "characters of one message's text")
    option("max-tool-output-chars", int, limits.max_tool_output_chars, "characters of one tool output")
    option(
        "max-tool-outputs-total-chars",
        int,
        limits.max_tool_outputs_total_chars,
        "characters of all outputs of one SubmitToolResults",
    )
    parser.add_argument(
        "--retention",
        default=_env("retention", "off"),
        metavar="DURATION",
        help="delete finished runs (with their events and steps) this long after they end: "
        "seconds or 90s, 15m, 12h, 7d; off keeps them forever",
    )
    option(
        "metrics-port",
        int,
        None,
        "serve Prometheus metrics over HTTP on this port (unset: off; 0: any free port, printed at start)",
    )
    option("metrics-host", str, None, "address of the metrics endpoint (default: --host); it has no auth")
    option(
        "openai-port",
        str,
        "auto",
        "serve the OpenAI Assistants API (REST + SSE) on this port: auto is --port + 1 (50052), "
        "or any free port when --port is 0 (if --port + 1 is taken: off, with a warning); "
        "off disables it",
    )
    option("openai-host", str, None, "address of the OpenAI Assistants API (default: --host)")
    return parser


def openai_port(value: str, grpc_port: int) -> int | None:
    """--openai-port: auto (the gRPC port + 1, any free port with --port 0), off, or a port."""
    if value == "off":
        return None
    if value == "auto":
        return grpc_port + 1 if grpc_port else 0
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("must be between 0 and 65535")
    return port


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    _refuse_bad_environment(parser, args)
    api_keys: dict[str, str] = {}
    for item in args.api_key:
        key, sep, project = item.partition("=")
        if not sep or not key or not project:
            parser.error(f"--api-key wants KEY=PROJECT, got {item!r}")
        api_keys[key] = project
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.log_format not in ("auto", "json", "console"):
        parser.error("--log-format must be auto, json or console")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)")
    local = is_local_host(args.host)
    keyed = bool(api_keys) or args.api_keys_file is not None
    if not local and not keyed and not args.allow_unauthenticated_remote:
        parser.error(
            f"listening on {args.host} without API keys would let anyone in: "
            "give --api-keys-file PATH or --allow-unauthenticated-remote"
        )
    providers: list[ProviderConfig] = []
    for spec in args.provider:
        try:
            providers.append(parse_provider_spec(spec))
        except ValueError as exc:
            parser.error(f"--provider: {exc}")
    names = [p.name for p in providers]
    if len(set(names)) != len(names):
        parser.error(f"--provider: each provider needs its own name, got {names}")
    default_provider, _, default_provider_model = args.default_model.partition("/")
    if args.default_model != "builtin" and default_provider not in names:
        parser.error(
            f"--default-model {args.default_model!r} names no configured provider ({names or 'none'})"
        )
    if args.default_model != "builtin" and not default_provider_model:
        # The model registry refuses a bare provider name: every call would be INVALID_ARGUMENT.
        parser.error(f"--default-model {args.default_model!r}: use builtin or PROVIDER/MODEL")
    limit_names = (
        "max_active_runs_per_project",
        "max_listen_streams_per_project",
        "max_tools",
        "max_message_chars",
        "max_tool_output_chars",
        "max_tool_outputs_total_chars",
    )
    try:
        retention = parse_duration(args.retention)
    except ValueError as exc:
        parser.error(f"--retention: {exc}")
    postgres_dsn = args.database.strip() if is_postgres_dsn(args.database) else None
    if args.pg_pool_min < 0 or args.pg_pool_max < 1:
        parser.error("--pg-pool-min must be 0 or more and --pg-pool-max at least 1")
    if args.pg_pool_min > args.pg_pool_max:
        parser.error("--pg-pool-min must not exceed --pg-pool-max")
    for name in ("max_concurrent_runs", "max_attempts", *limit_names):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    # `not x > 0` rather than `x <= 0`: NaN must fail too (it would disable the deadline).
    for name in ("tool_timeout", "run_timeout", "lease_seconds"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.replica_id is not None and not REPLICA_ID.fullmatch(args.replica_id):
        parser.error("--replica-id must be 1 to 64 letters, digits, '.', '_', ':' or '-'")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error("--metrics-port must be between 0 and 65535")
    try:
        openai = openai_port(args.openai_port, args.port)
    except ValueError as exc:
        parser.error(f"--openai-port must be auto, off or a port: {exc}")
    grpc_limits = (
        "grpc_max_concurrent_streams",
        "grpc_max_pending_requests",
        "grpc_max_pending_seconds",
        "max_concurrent_rpcs",
        "gc_threshold",
    )
    for name in grpc_limits:
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("grace_period", "coalesce_ms"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    return ServerConfig(
        host=args.host,
        port=args.port,
        database=Path(args.database) if postgres_dsn is None else ServerConfig().database,
        postgres_dsn=postgres_dsn,
        pg_pool_min=args.pg_pool_min,
        pg_pool_max=args.pg_pool_max,
        default_model=args.default_model,
        providers=tuple(providers),
        api_keys=api_keys,
        allow_unauthenticated_remote=args.allow_unauthenticated_remote,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        api_keys_file=args.api_keys_file,
        tls_client_ca=args.tls_client_ca,
        grace_period=args.grace_period,
        max_message_bytes=args.max_message_bytes,
        grpc_max_concurrent_streams=args.grpc_max_concurrent_streams,
        grpc_max_pending_requests=args.grpc_max_pending_requests,
        grpc_max_pending_seconds=args.grpc_max_pending_seconds,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        gc_threshold=args.gc_threshold,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        openai_port=openai,
        openai_host=args.openai_host,
        openai_port_auto=args.openai_port == "auto",
        engine=EngineConfig(
            max_concurrent_runs=args.max_concurrent_runs,
            tool_timeout=args.tool_timeout,
            run_timeout=args.run_timeout,
            lease_seconds=args.lease_seconds,
            coalesce_window=max(args.coalesce_ms, 0.0) / 1000,
            max_attempts=args.max_attempts,
            replica_id=args.replica_id,
        ),
        limits=Limits(**{name: getattr(args, name) for name in limit_names}),
        retention=retention,
    )
