"""Render deploy/nginx/spindle.conf for some replicas: the http-level block, or a whole nginx.conf.

    python scripts/nginx_conf.py --listen 127.0.0.1:8080 \\
        --upstream 127.0.0.1:50051 --upstream 127.0.0.1:50052 --upstream 127.0.0.1:50053 \\
        > /etc/nginx/conf.d/spindle.conf

With ``--prefix DIR`` the output is a complete nginx.conf that keeps its pid, logs and temporary
files in DIR, for ``nginx -p DIR -c DIR/nginx.conf -e DIR/error.log -g 'daemon off;'`` as any
user (the tests run it that way).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "spindle.conf"
DEFAULT_ACCESS_LOG = "/var/log/nginx/spindle-access.log"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

STANDALONE = """\
# A standalone nginx for Spindle's replicas; everything it writes stays under {prefix}.
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;

events {{
    worker_connections 1024;
}}

http {{
{temp_paths}
{block}
}}
"""


def render_block(listen: str, upstreams: Sequence[str], access_log: str = DEFAULT_ACCESS_LOG) -> str:
    """The template with the listen address, the replicas and the access log filled in."""
    if not upstreams:
        raise ValueError("at least one --upstream is needed")
    for address in (listen, *upstreams):
        if not address or any(c.isspace() or c in ";{}" for c in address):
            raise ValueError(f"not an address: {address!r}")
    servers = "\n".join(f"    server {address};" for address in upstreams)
    return (
        TEMPLATE.read_text()
        .replace("@UPSTREAMS@", servers)
        .replace("@LISTEN@", listen)
        .replace("@ACCESS_LOG@", access_log)
    )


def render_standalone(listen: str, upstreams: Sequence[str], prefix: Path) -> str:
    """A whole nginx.conf around the block, writing only under ``prefix``."""
    temp_paths = "\n".join(f"    {name}_temp_path {prefix}/{name};" for name in TEMP_PATHS)
    block = render_block(listen, upstreams, access_log=f"{prefix}/access.log")
    indented = "\n".join(f"    {line}" if line else "" for line in block.splitlines())
    return STANDALONE.format(prefix=prefix, temp_paths=temp_paths, block=indented)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", required=True, help="address nginx listens on, e.g. 127.0.0.1:8080")
    parser.add_argument(
        "--upstream", action="append", default=[], required=True, help="a replica's HOST:PORT (repeat)"
    )
    parser.add_argument("--access-log", default=DEFAULT_ACCESS_LOG, help="nginx's access log of the calls")
    parser.add_argument("--prefix", type=Path, help="write a whole nginx.conf that keeps its files here")
    args = parser.parse_args(argv)
    try:
        if args.prefix is not None:
            text = render_standalone(args.listen, args.upstream, args.prefix.resolve())
        else:
            text = render_block(args.listen, args.upstream, args.access_log)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
