"""`spindle-server keys add|list|remove`: manage the API keys file (the server reloads it on SIGHUP).

`add` prints the new key once on stdout, and nothing else there (`KEY=$(spindle-server keys add ...)`);
the file only ever holds its hash. Exit codes: 0 done, 1 the file is unusable, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from spindle_server import keys

FILE_ENV = "SPINDLE_API_KEYS_FILE"
SHOWN_HEX_DIGITS = 12


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spindle-server keys",
        description="Manage the API keys file of --api-keys-file. Send the server SIGHUP "
        "(kill -HUP PID) to apply a change without a restart.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="make a key for a project, store its hash, print the key once")
    add.add_argument("--project", required=True, help="the project the key acts for")
    listing = commands.add_parser("list", help="hash prefixes and projects (keys are never stored)")
    remove = commands.add_parser("remove", help="remove the key whose hash starts with HASH")
    remove.add_argument("hash", metavar="HASH", help="at least 8 hex digits of its hash, as `list` shows")
    for command in (add, listing, remove):
        command.add_argument(
            "--file",
            type=Path,
            default=os.environ.get(FILE_ENV) or None,
            required=not os.environ.get(FILE_ENV),
            help=f"the API keys file (env {FILE_ENV})",
        )
    return parser


def main(argv: Sequence[str], stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    path: Path = args.file
    try:
        if args.command == "add":
            key = keys.add(path, args.project)
            print(key, file=out, flush=True)
            print(
                f"added a key for project {args.project} to {path}; it is shown only this once. "
                "Reload the server with: kill -HUP <server pid>",
                file=err,
            )
        elif args.command == "list":
            for entry in keys.load(path):
                print(f"{keys.SCHEME}{entry.digest.hex()[:SHOWN_HEX_DIGITS]}  {entry.project}", file=out)
        else:
            removed = keys.remove(path, args.hash)
            print(
                f"removed {keys.SCHEME}{removed.digest.hex()[:SHOWN_HEX_DIGITS]} ({removed.project}) "
                f"from {path}. Reload the server with: kill -HUP <server pid>",
                file=err,
            )
    except keys.KeyFileError as exc:
        print(f"spindle-server keys: {exc}", file=err)
        return 1
    except OSError as exc:
        print(f"spindle-server keys: {path}: {exc.strerror or exc}", file=err)
        return 1
    return 0
