"""The API keys file: one `sha256:<hex> PROJECT` line per key; the keys themselves are never stored.

    # comments and blank lines are ignored
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 alpha

The hex is SHA-256 of the whole key as the client sends it (`authorization: Bearer KEY`). Keys
are random 256-bit tokens, so an unsalted fast hash is enough: there is nothing to guess from it.
Error messages name the line number, never the line: a key pasted by mistake must not reach a log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

SCHEME = "sha256:"
KEY_PREFIX = "sk-spindle-"
PROJECT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HEX = re.compile(r"[0-9a-f]{64}")
LINE_FORMAT = f"'{SCHEME}<64 hex digits> PROJECT'"


class KeyFileError(Exception):
    """The file cannot be used as it is (unreadable, or a line that is not a key)."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    digest: bytes  # SHA-256 of the key
    project: str
    line: int

    @property
    def hash_text(self) -> str:
        return SCHEME + self.digest.hex()


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def new_key() -> str:
    """A fresh key: 256 random bits behind a prefix that secret scanners and people recognise."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def valid_project(project: str) -> bool:
    return PROJECT_PATTERN.fullmatch(project) is not None


def parse(text: str, source: str) -> list[KeyEntry]:
    """Every key line of `text`, or KeyFileError naming the first bad line's number."""
    entries: list[KeyEntry] = []
    seen: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise KeyFileError(f"{source}, line {number}: expected {LINE_FORMAT}")
        hashed, project = fields
        if not hashed.startswith(SCHEME) or not _HEX.fullmatch(hashed[len(SCHEME) :].lower()):
            raise KeyFileError(f"{source}, line {number}: the hash must be {SCHEME}<64 hex digits>")
        if not valid_project(project):
            raise KeyFileError(f"{source}, line {number}: a project is 1-63 letters, digits, '.', '_' or '-'")
        value = bytes.fromhex(hashed[len(SCHEME) :])
        if value in seen:
            raise KeyFileError(f"{source}, line {number}: the same key as line {seen[value]}")
        seen[value] = number
        entries.append(KeyEntry(value, project, number))
    return entries


def _read(path: Path, *, missing_ok: bool = False) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return ""
        raise KeyFileError(f"cannot read the API keys file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KeyFileError(f"cannot read the API keys file {path}: {reason}") from exc


def load(path: Path) -> list[KeyEntry]:
    return parse(_read(path), str(path))


def writable_by_others(path: Path) -> bool:
    """Whoever can write the file can let themselves in: the server warns about it."""
    try:
        return bool(path.stat().st_mode & 0o022)
    except OSError:
        return False


def add(path: Path, project: str) -> str:
    """Append a new key's hash line for `project` (creating the file 0600) and return the key.

    The file is checked first: appending to a file the server would refuse helps nobody."""
    if not valid_project(project):
        raise KeyFileError(f"project {project!r}: use 1-63 letters, digits, '.', '_' or '-'")
    text = _read(path, missing_ok=True)
    parse(text, str(path))
    key = new_key()
    line = f"{SCHEME}{digest(key).hex()} {project}\n"
    if text and not text.endswith("\n"):
        line = "\n" + line
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as file:
        file.write(line)
        file.flush()
        os.fsync(file.fileno())
    return key


def remove(path: Path, hash_prefix: str) -> KeyEntry:
    """Drop the one key whose hash starts with `hash_prefix` (at least 8 hex digits), rewriting the
    file atomically with its mode kept; comments and other lines stay as they are."""
    wanted = hash_prefix.lower().removeprefix(SCHEME)
    if not re.fullmatch(r"[0-9a-f]{8,64}", wanted):
        raise KeyFileError("give at least 8 hex digits of the key's hash (see `keys list`)")
    text = _read(path)
    entries = parse(text, str(path))
    matches = [entry for entry in entries if entry.digest.hex().startswith(wanted)]
    if len(matches) != 1:
        found = "no key" if not matches else f"{len(matches)} keys"
        raise KeyFileError(f"{found} in {path} with a hash starting {wanted}")
    drop = matches[0].line
    kept = [line for number, line in enumerate(text.splitlines(keepends=True), start=1) if number != drop]
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, path.stat().st_mode & 0o777)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write("".join(kept))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return matches[0]
