"""What each ``spindle`` command does; each returns its exit code."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from spindle._requests import AssistantOptions, RunOptions
from spindle.cli import _exit
from spindle.cli._output import Output
from spindle.cli._spinner import Spinner
from spindle.client import Client
from spindle.enums import RunStatus
from spindle.results import RunEvent, RunResult
from spindle.run import Run

Command = Callable[[Client, argparse.Namespace, Output], int]


def pairs(items: list[str], what: str) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict; ValueError names the bad one."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} wants KEY=VALUE, got {item!r}")
        result[key] = value
    return result


# ---- resources --------------------------------------------------------------------------------


def assistants(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.action == "create":
        options: AssistantOptions = {"labels": pairs(args.label, "--label")}
        for name in ("name", "description", "model", "instructions"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
        if args.tool:
            options["tools"] = [{"name": name} for name in args.tool]
        out.item(client.assistants.create(**options))
    elif args.action == "list":
        out.items(client.assistants.list(limit=args.limit, order=args.order))
    elif args.action == "get":
        out.item(client.assistants.get(args.id))
    else:
        client.assistants.delete(args.id)
        out.note(f"deleted {args.id}")
    return _exit.OK


def threads(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.action == "create":
        labels = pairs(args.label, "--label")
        out.item(client.threads.create(name=args.name, messages=args.message, labels=labels))
    elif args.action == "list":
        out.items(client.threads.list(limit=args.limit, order=args.order))
    elif args.action == "get":
        out.item(client.threads.get(args.id))
    else:
        client.threads.delete(args.id)
        out.note(f"deleted {args.id}")
    return _exit.OK


def messages(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.action == "create":
        labels = pairs(args.label, "--label")
        out.item(client.messages.create(args.thread_id, args.text, role=args.role, labels=labels))
    elif args.action == "list":
        out.items(client.messages.list(args.thread_id, run_id=args.run, limit=args.limit, order=args.order))
    else:
        out.item(client.messages.get(args.id))
    return _exit.OK


def runs(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.action == "create":
        options: RunOptions = {"labels": pairs(args.label, "--label")}
        if args.instructions is not None:
            options["instructions"] = args.instructions
        if args.model is not None:
            options["model"] = args.model
        run = client.runs.create(thread_id=args.thread, assistant_id=args.assistant, **options)
        if not args.wait:
            out.item(run)
            return _exit.OK
        return _wait_and_print(run, args.timeout, out)
    if args.action == "list":
        statuses = [RunStatus[s.upper()] for s in args.status]
        listing = client.runs.list(
            thread_id=args.thread,
            assistant_id=args.assistant,
            statuses=statuses,
            limit=args.limit,
            order=args.order,
        )
        out.items(listing)
    elif args.action == "get":
        out.item(client.runs.get(args.id))
    else:
        out.items(client.runs.list_steps(args.id, order="asc"))
    return _exit.OK


# ---- following a run --------------------------------------------------------------------------


def _wait_and_print(run: Run, timeout: float, out: Output) -> int:
    with Spinner(out.stderr, f"waiting for {run.id}"):
        result = run.wait(timeout=timeout)
    out.result(result)
    return _exit.for_result(result)


def wait(client: Client, args: argparse.Namespace, out: Output) -> int:
    return _wait_and_print(client.runs.get(args.run_id), args.timeout, out)


def cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.item(client.runs.cancel(args.run_id))
    return _exit.OK


def submit(client: Client, args: argparse.Namespace, out: Output) -> int:
    run = client.runs.submit_tool_results(args.run_id, pairs(args.output, "--output"))
    if not args.wait:
        out.item(run)
        return _exit.OK
    return _wait_and_print(run, args.timeout, out)


def listen(client: Client, args: argparse.Namespace, out: Output) -> int:
    run = client.runs.get(args.run_id)
    for event in run.listen(events_start_idx=args.start, timeout=args.timeout):
        out.item(event)  # each event updates the handle too
    if not run.status.is_finished:  # --from was past the end: no event brought the outcome
        run.refresh()
    return _exit.for_result(run.result)


CHAT_ASSISTANT_NAME = "spindle-chat"
CHAT_ASSISTANT_LABEL = ("spindle-cli", "chat")


def chat_assistant(client: Client) -> str:
    """The project's chat assistant for the CLI: the oldest one labelled for it, made once.

    Assistants cannot be listed by label, so the listing is read oldest first (where the one
    made on the first chat sits); two first chats at once may make two, and both then pick the
    older.
    """
    key, value = CHAT_ASSISTANT_LABEL
    for assistant in client.assistants.list(order="asc", page_size=100):
        if assistant.labels.get(key) == value:
            return assistant.id
    return client.assistants.create(name=CHAT_ASSISTANT_NAME, labels={key: value}).id


def chat(client: Client, args: argparse.Namespace, out: Output) -> int:
    assistant_id = args.assistant or chat_assistant(client)
    if args.thread:
        client.messages.create(args.thread, args.text)
        thread_id = args.thread
    else:
        thread_id = client.threads.create(messages=[args.text]).id
        out.note(f"thread {thread_id} (continue with --thread {thread_id})")
    run = client.runs.create(thread_id=thread_id, assistant_id=assistant_id)
    printer = _ReplyPrinter(out, Spinner(out.stderr, f"waiting for {run.id}").start())
    try:
        result = run.stream(on_event=printer.on_event, timeout=args.timeout)
    finally:
        printer.spinner.stop()
    printer.finish(result)
    return _exit.for_result(result)


class _ReplyPrinter:
    """Writes the reply to stdout as it arrives (or the events as JSON lines with --json)."""

    def __init__(self, out: Output, spinner: Spinner) -> None:
        self.out = out
        self.spinner = spinner
        self.printed = False

    def on_event(self, event: RunEvent) -> None:
        if self.out.as_json:
            self.out.json(event)
            return
        if event.discard_partial_message and self.printed:
            self.out.stdout.write("\n")
            self.out.note("[the server retried the model: the text since its last tool calls is void]")
            self.printed = False
        if event.delta:
            self.spinner.stop()
            self.out.stdout.write(event.delta)
            self.out.stdout.flush()
            self.printed = True

    def finish(self, result: RunResult) -> None:
        if self.out.as_json:
            return
        if self.printed:
            self.out.line()
        if result.is_paused:
            self.out.result(result)
        elif result.error is not None:
            self.out.note(f"run {result.status_name}: {result.error}")


COMMANDS: dict[str, Command] = {
    "assistants": assistants,
    "threads": threads,
    "messages": messages,
    "runs": runs,
    "chat": chat,
    "listen": listen,
    "wait": wait,
    "cancel": cancel,
    "submit": submit,
}
