"""The command line: ``spindle [options] COMMAND ...`` (argparse)."""

from __future__ import annotations

import argparse

from spindle._channel import API_KEY_ENV, DEFAULT_TARGET, TARGET_ENV
from spindle.cli import _exit

EPILOG = f"""\
exit codes: {_exit.OK} success (run COMPLETED), {_exit.RUN_FAILED} run failed/cancelled/incomplete/expired,
{_exit.USAGE} usage error, {_exit.RPC_ERROR} call failed (unreachable, not found, invalid argument...),
{_exit.TIMEOUT} timeout (the run goes on), {_exit.TOOL_CALLS} run waits for tool results (see `submit`),
{_exit.BROKEN_PIPE} the output was closed early (`| head`).
"""


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted before and after the command (``suppress``: keep the value given first)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--target",
        default=default(None),
        help=(
            f"server address host:port (env {TARGET_ENV}, default {DEFAULT_TARGET}); several replicas:"
            " h1:p1,h2:p2,... or dns:///name:port, calls spread round-robin"
        ),
    )
    parser.add_argument("--api-key", default=default(None), help=f"API key (env {API_KEY_ENV})")
    parser.add_argument("--tls", action="store_true", default=default(False), help="connect with TLS")
    parser.add_argument("--ca-file", default=default(None), help="PEM roots to trust for TLS (implies --tls)")
    parser.add_argument(
        "--tls-client-cert",
        default=default(None),
        help="PEM client certificate for a server that requires one (mutual TLS; implies --tls)",
    )
    parser.add_argument(
        "--tls-client-key", default=default(None), help="PEM private key of --tls-client-cert"
    )
    parser.add_argument(
        "--rpc-timeout", type=float, default=default(30.0), help="deadline of each call in seconds"
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON (for scripts) instead of text"
    )


def _labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)"
    )


def _listing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=None, help="at most this many items")
    parser.add_argument("--order", choices=("asc", "desc"), default=None, help="by creation (default desc)")


def _follow_timeout(parser: argparse.ArgumentParser, default: float = 300.0) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        help=f"wall-clock seconds to follow the run (default {default:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spindle",
        description="Run AI assistants on conversation threads with a Spindle server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str
    ) -> argparse.ArgumentParser:
        return group.add_parser(name, help=help_text, description=help_text, parents=[common])

    # assistants
    assistants = command(commands, "assistants", "create, list and inspect assistants")
    actions = assistants.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(actions, "create", "create an assistant")
    create.add_argument("--name", default=None)
    create.add_argument("--description", default=None)
    create.add_argument("--model", default=None, help="default: the server's default model")
    create.add_argument("--instructions", default=None)
    create.add_argument(
        "--tool", action="append", default=[], metavar="NAME", help="a function tool (repeatable)"
    )
    _labels(create)
    _listing(command(actions, "list", "list assistants"))
    command(actions, "get", "show an assistant").add_argument("id")
    command(actions, "delete", "delete an assistant").add_argument("id")

    # threads
    threads = command(commands, "threads", "create, list and inspect threads")
    actions = threads.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(actions, "create", "create a thread")
    create.add_argument("--name", default=None)
    create.add_argument(
        "--message", action="append", default=[], metavar="TEXT", help="a first message (repeatable)"
    )
    _labels(create)
    _listing(command(actions, "list", "list threads"))
    command(actions, "get", "show a thread").add_argument("id")
    command(actions, "delete", "delete a thread with its messages and runs").add_argument("id")

    # messages
    messages = command(commands, "messages", "add and list a thread's messages")
    actions = messages.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(actions, "create", "add a message to a thread")
    create.add_argument("thread_id")
    create.add_argument("text")
    create.add_argument("--role", choices=("user", "assistant"), default="user")
    _labels(create)
    listing = command(actions, "list", "list a thread's messages")
    listing.add_argument("thread_id")
    listing.add_argument("--run", default=None, help="only this run's messages")
    _listing(listing)
    command(actions, "get", "show a message").add_argument("id")

    # runs
    runs = command(commands, "runs", "create, list and inspect runs")
    actions = runs.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(actions, "create", "start a run of an assistant on a thread")
    create.add_argument("--thread", required=True)
    create.add_argument("--assistant", required=True)
    create.add_argument("--instructions", default=None)
    create.add_argument("--model", default=None)
    create.add_argument("--wait", action="store_true", help="wait for the run and print its result")
    _follow_timeout(create)
    _labels(create)
    listing = command(actions, "list", "list runs")
    listing.add_argument("--thread", default=None)
    listing.add_argument("--assistant", default=None)
    listing.add_argument("--status", action="append", default=[], help="only these statuses (repeatable)")
    _listing(listing)
    command(actions, "get", "show a run").add_argument("id")
    command(actions, "steps", "list a run's steps").add_argument("id")

    # chat and run-id commands
    chat = command(commands, "chat", "send a message and stream the reply to the terminal")
    chat.add_argument("text")
    chat.add_argument(
        "--assistant",
        default=None,
        help="default: the project's spindle-chat assistant (label spindle-cli=chat), "
        "made with the server's default model on the first chat",
    )
    chat.add_argument("--thread", default=None, help="continue this thread (default: a new one)")
    _follow_timeout(chat)
    listen = command(commands, "listen", "print a run's events as they happen")
    listen.add_argument("run_id")
    listen.add_argument(
        "--from", dest="start", type=int, default=0, metavar="INDEX", help="first event index"
    )
    _follow_timeout(listen)
    wait = command(commands, "wait", "wait for a run to finish (or pause) and print its result")
    wait.add_argument("run_id")
    _follow_timeout(wait)
    command(commands, "cancel", "cancel a run").add_argument("run_id")
    submit = command(commands, "submit", "answer a paused run's tool calls")
    submit.add_argument("run_id")
    submit.add_argument(
        "--output",
        action="append",
        default=[],
        required=True,
        metavar="CALL_ID=TEXT",
        help="one per tool call",
    )
    submit.add_argument("--wait", action="store_true", help="then wait and print the result")
    _follow_timeout(submit)
    return parser
