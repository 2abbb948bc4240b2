"""`spindle-server`: run the Spindle gRPC server; `spindle-server keys ...` manages API keys."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["keys"]:  # the server takes no positional argument, so this is unambiguous
        # Before the server's imports (grpc, the models' clients): `keys` starts in a blink.
        from spindle_server import keys_cli

        sys.exit(keys_cli.main(args[1:]))
    run_server(args)


def run_server(args: Sequence[str]) -> None:
    import asyncio

    from spindle_server.config import parse_config
    from spindle_server.logs import configure
    from spindle_server.server import StartupError, serve
    from spindle_server.store.errors import UnavailableError

    config = parse_config(args)
    configure(config.log_level, config.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(config))
    except (UnavailableError, StartupError) as exc:
        print(f"spindle-server: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
