"""`spindle-server`: run the Spindle gRPC server."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from spindle_server.config import parse_config
from spindle_server.logs import configure
from spindle_server.server import StartupError, serve
from spindle_server.store.errors import UnavailableError


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
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
