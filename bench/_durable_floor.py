"""The floor of a durable write, for the bare echo server: a unary method that appends its request
to a SQLite file (WAL, synchronous=FULL) and answers once that is committed.

It is built the way Spindle's SQLite store writes, with nothing else: one writer thread owns the
connection; the requests that arrive in one turn of the event loop are handed to it together and
become one multi-row INSERT in autocommit (one commit, one fdatasync, for all of them); its answer
wakes the waiting calls with one call_soon_threadsafe. What a durable write costs any grpc.aio
service on this machine before it validates, builds or indexes anything.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from pathlib import Path

import grpc

CHUNK = 500  # rows per INSERT: well under SQLite's limit of bound parameters
Batch = list[tuple[bytes, asyncio.Future[None]]]


class DurableLog:
    def __init__(self, path: Path) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.execute(
            "CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)"
        )
        self._turn: Batch = []  # the requests of this loop turn, not yet handed to the writer
        self._batches: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, Batch]] = queue.SimpleQueue()
        threading.Thread(target=self._write_forever, name="floor-writer", daemon=True).start()

    async def append(self, request: bytes, _: grpc.aio.ServicerContext) -> bytes:
        """Answers the request's bytes (the echo's answer) once they are committed."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not self._turn:
            loop.call_soon(self._hand_over, loop)  # at the end of this turn, with the others
        self._turn.append((request, done))
        await done
        return request

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._turn = self._turn, []
        self._batches.put((loop, batch))

    def _write_forever(self) -> None:
        while True:
            loop, batch = self._batches.get()
            while not self._batches.empty():  # everything handed over meanwhile: one commit
                batch += self._batches.get()[1]
            for start in range(0, len(batch), CHUNK):
                rows = batch[start : start + CHUNK]
                values = ",".join("(?)" for _ in rows)
                self._connection.execute(
                    f"INSERT INTO log (body) VALUES {values}", [body for body, _ in rows]
                )
            loop.call_soon_threadsafe(_answer, [done for _, done in batch])


def _answer(waiting: list[asyncio.Future[None]]) -> None:
    for done in waiting:
        if not done.done():  # the call may have been cancelled meanwhile
            done.set_result(None)
