"""Watching a running server from a test: its metrics, and waiting (bounded) for a condition."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from support.server import ServerProcess


def open_listens(server: ServerProcess) -> float:
    """The server's own count of open Listen streams, scraped from its metrics endpoint."""
    url = f"http://127.0.0.1:{server.serving['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "spindle_listen_streams":
                return float(sample.value)
    raise AssertionError("no spindle_listen_streams gauge")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Until `condition()` holds; `timeout` is a failure bound, not a timing."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)
