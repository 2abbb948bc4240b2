"""``spindle``: the command-line client. ``main()`` is the console script's entry point."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from spindle.cli import _exit
from spindle.cli._commands import COMMANDS
from spindle.cli._output import Output
from spindle.cli._parser import build_parser
from spindle.client import Client
from spindle.errors import ApiError, RunTimeoutError, SpindleError

__all__ = ["main"]


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run one command; returns the exit code (see ``spindle --help``)."""
    out = Output(stdout or sys.stdout, stderr or sys.stderr, as_json=False)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else _exit.USAGE
    out.as_json = args.json
    try:
        roots = Path(args.ca_file).read_bytes() if args.ca_file else None
        cert = Path(args.tls_client_cert).read_bytes() if args.tls_client_cert else None
        key = Path(args.tls_client_key).read_bytes() if args.tls_client_key else None
        client = Client(
            args.target,
            api_key=args.api_key,
            tls=args.tls or roots is not None or cert is not None,
            root_certificates=roots,
            client_cert=cert,
            client_key=key,
            timeout=args.rpc_timeout,
        )
    except (OSError, ValueError) as exc:  # unreadable file, --rpc-timeout <= 0, cert without key
        out.note(f"error: {exc}")
        return _exit.USAGE
    try:
        return COMMANDS[args.command](client, args, out)
    except BrokenPipeError:  # the reader went away (`spindle ... | head`): stop quietly
        _exit.silence_closed_pipe(out.stdout, out.stderr)
        return _exit.BROKEN_PIPE
    except RunTimeoutError as exc:
        out.note(f"timeout: {exc} (the run goes on)")
        return _exit.TIMEOUT
    except ApiError as exc:
        out.note(f"error: {exc}")
        for violation in exc.field_violations:
            out.note(f"  {violation.field}: {violation.description}")
        return _exit.RPC_ERROR
    except (SpindleError, ValueError) as exc:
        out.note(f"error: {exc}")
        return _exit.USAGE
    except KeyboardInterrupt:
        out.note("interrupted")
        return _exit.INTERRUPTED
    finally:
        client.close()
