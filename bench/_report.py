"""BENCHMARKS.md: each benchmark owns one marked section and rewrites only that one."""

from __future__ import annotations

from pathlib import Path

from bench.wait_latency import PROFILE, Row, push_samples, reply_seconds, samples, short_reply_seconds

HEADER = "# Benchmarks\n\nMeasured by `make bench` (`python -m bench`) against a real server on 127.0.0.1.\n"


def wait_latency_section(rows: list[Row], machine: str, when: str, elapsed: float) -> str:
    low, high = reply_seconds()
    short_low, short_high = short_reply_seconds()
    lines = [
        "## How soon `Run.wait()` returns after a run ends",
        "",
        "Latency = when the waiting call returned, minus the `created_at` of the run's terminal event",
        "(both on this machine's clock). Each sample is one run of the builtin model that streams its",
        f"reply over a random {low:g}-{high:g} s (`/sleep`), a whole polling interval, so a",
        "poller's phase against the run's end is uniform. The pollers start at the run's creation, like",
        "OpenAI's `create_and_poll` (Get, then sleep the interval, until the status is terminal);",
        "the methods take turns sample by sample, one run at a time, against one server (SQLite).",
        f"{samples()} runs per method; the pollers' p99 is close to the worst sample. Then the two methods",
        f"the server tells, `Run.wait()` and the Wait long-poll, take turns over {push_samples()} more runs",
        f"each, short ones ({short_low:g}-{short_high:g} s: how soon they learn does not depend on the run's",
        "length), so that their p99 is not just their worst sample. Calls per run counts every",
        "RPC the method made (Get, ListenBatches, Listen, Wait). Source: `bench/wait_latency.py`.",
        "",
        "| method | runs | p50 (ms) | p99 (ms) | mean (ms) | calls per run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.samples} | {row.p50_ms:.1f} | {row.p99_ms:.1f} | {row.mean_ms:.1f} "
            f"| {row.calls_per_run:.1f} |"
        )
    lines += [
        "",
        f"Measured {when} on {machine}; the whole benchmark took {elapsed:.0f} s.",
        "",
        "Reading it: polling learns of the end half an interval late on average and a whole interval",
        "late at worst, and pays one Get per interval; `Run.wait()` is told by the stream within",
        "milliseconds (one Get to start, one ListenBatches stream whose terminal event carries the",
        "finished run: no Get after it).",
        "",
        PROFILE,
    ]
    return "\n".join(lines)


def update_section(path: Path, name: str, body: str) -> None:
    """Replace the section between ``<!-- bench:NAME -->`` markers (appending it the first time)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body}{end}\n"
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
