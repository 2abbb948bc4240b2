"""Stored bodies kept in memory, coherent with the one SQLite writer (RunService.Get's bytes).

One process owns the file and every change to it goes through SqliteDatabase's writer thread
(the schema at open, before any read; every batch: API writes, claims, lease renewals,
retention, purges, migrations at start). So the writer alone can say when the file may have
changed, and the cache follows a simple protocol:

- The writer calls `writing()` before it executes anything of a batch and `written()` after
  the batch's COMMIT (or ROLLBACK) returned and before anyone is told of it: `written()` drops
  every entry, bumps the generation and clears the flag. Coarse (any batch drops everything),
  and so right whatever the batch touched.
- `get` answers only while no batch is in flight. From the COMMIT to `written()` the flag is
  still set, so a Get sent by a client who already saw the commit (a listener reading the
  committed event from the file, another process, the tests' own read-only connection) reads
  the file, never the older body.
- A read fills the cache (`fill`) only if, when it is put in, no batch is in flight and the
  generation is the one taken (`generation`) before the read began: then no batch ran at any
  moment between the read's start and the fill, so what it read is the last commit. The check
  and the insertion hold the lock `writing()` and `written()` take, so a batch cannot start or
  end between them.

`get` and `fill` run on the event loop's thread (a pool read fills after its await, back on
the loop); `writing` and `written` on the writer thread. `get` takes no lock: it reads the flag
and then the dict, each one step under the GIL; a batch that begins between the two began after
this Get did, which may then answer the state before it, as it may when their order is the
other way round.

`close()` (the database closing) ends it for good: the writer's last batches do not bring it
back, and once the owner's lock is let go another process may write the file.

A change another process makes to the file while the server runs (the sqlite3 shell: the
design does not allow it, nothing stops it) is seen after the next batch, which comes within a
second on an idle server (the claim loop's poll is a batch).

Bounded: at most `max_entries` bodies and `max_bytes` of them (oldest put in dropped first; a
body larger than a sixteenth of `max_bytes` is never kept).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from spindle_server import metrics

MAX_ENTRIES = 4096
MAX_BYTES = 8 * 1024 * 1024


class BodyCache:
    __slots__ = (
        "_bytes",
        "_closed",
        "_counts",
        "_entries",
        "_generation",
        "_lock",
        "_writing",
        "max_bytes",
        "max_entries",
    )

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0  # the sum of the kept bodies' lengths
        self._writing = False
        self._closed = False
        self._generation = 0
        self._lock = threading.Lock()
        self._counts = metrics.RUN_CACHE

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    # ---- the event loop's side ---------------------------------------------------------------

    def get(self, key: Hashable) -> bytes | None:
        """The kept body, or None (not kept, or a batch is in flight: read the file, and count
        that read with `missed`)."""
        if not self._writing:
            body = self._entries.get(key)
            if body is not None:
                self._counts.hits += 1
                return body
        return None

    def missed(self) -> None:
        """A body read from the file after `get` had none."""
        self._counts.misses += 1

    @property
    def generation(self) -> int:
        """Taken before a read that may `fill`."""
        return self._generation

    def fill(self, key: Hashable, body: bytes, generation: int) -> bool:
        """Keeps `body`, read after `generation` was taken, if no batch ran since; True if kept."""
        size = len(body)
        if size * 16 > self.max_bytes:
            return False
        entries = self._entries
        with self._lock:
            if self._writing or self._generation != generation:
                return False
            old = entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            entries[key] = body
            self._bytes += size
            while len(entries) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = entries.popitem(last=False)
                self._bytes -= len(dropped)
        return True

    # ---- the writer thread's side --------------------------------------------------------------

    def writing(self) -> None:
        """Before a batch executes anything: Gets read the file until `written`."""
        with self._lock:
            self._writing = True

    def written(self) -> None:
        """After the batch's COMMIT or ROLLBACK, before anyone is told of it."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._generation += 1
            self._writing = self._closed

    def close(self) -> None:
        """For good: nothing is answered or kept any more (the database is closing)."""
        with self._lock:
            self._closed = self._writing = True
            self._entries.clear()
            self._bytes = 0
