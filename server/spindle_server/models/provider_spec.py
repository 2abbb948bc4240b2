"""An OpenAI-compatible provider's settings: `ProviderConfig`, read by `parse_provider_spec` from a
flag value such as `openai=https://api.openai.com/v1,timeout=60`. Apart from the backend
(models/openai_backend.py) so that reading the flags does not import the `openai` package: a
server with no provider configured never loads it (about half a second of every start).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

# `max_tokens` is what llama.cpp's server, Ollama, vLLM, Yandex AI Studio and OpenAI's
# non-reasoning models accept; OpenAI's reasoning models (o-series, gpt-5) reject it and want
# `max_completion_tokens`, which llama.cpp and Ollama ignore. So: the new name for OpenAI
# itself, the old one everywhere else, and a spec option to override either way.
MaxTokensField = Literal["max_tokens", "max_completion_tokens"]
OPENAI_HOSTS = frozenset({"api.openai.com"})

_PROVIDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_NAMES = frozenset({"builtin"})


@dataclass(frozen=True)
class ProviderConfig:
    """One OpenAI-compatible endpoint.

    timeout: seconds to connect and to get the response started; it also bounds any single
      socket read, so the effective stall limit is min(stall_timeout, timeout).
    stall_timeout: seconds a started stream may go without a chunk before it is closed.
    max_retries: extra attempts after a transient failure, before any output was streamed.
    initial_backoff, max_backoff: the retry delay doubles from initial_backoff up to
      max_backoff, with jitter; a Retry-After longer than max_backoff ends the retries.
    max_tokens_field: the request field for ModelRequest.max_tokens; None picks
      max_completion_tokens for api.openai.com and max_tokens elsewhere.
    """

    name: str
    base_url: str
    api_key: str = field(default="", repr=False)
    api_key_env: str = ""  # the variable api_key was read from, named in error hints
    timeout: float = 60.0
    stall_timeout: float = 60.0
    max_retries: int = 3
    initial_backoff: float = 0.5
    max_backoff: float = 20.0
    max_tokens_field: MaxTokensField | None = None

    def __post_init__(self) -> None:
        if not _PROVIDER_NAME.match(self.name) or self.name in _RESERVED_NAMES:
            raise ValueError(
                f"invalid provider name {self.name!r}: use letters, digits, '_', '.', '-' (not 'builtin')"
            )
        if not _is_http_url(self.base_url):
            raise ValueError(f"provider {self.name}: base URL must be http(s)://HOST[:PORT]/PATH")
        for option in ("timeout", "stall_timeout", "initial_backoff", "max_backoff"):
            value = getattr(self, option)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"provider {self.name}: {option} must be a positive number of seconds")
        if self.max_retries < 0:
            raise ValueError(f"provider {self.name}: max_retries must be 0 or more")
        if self.max_tokens_field not in (None, *get_args(MaxTokensField)):
            raise ValueError(
                f"provider {self.name}: max_tokens_field must be max_tokens or max_completion_tokens"
            )

    @property
    def completion_limit_field(self) -> MaxTokensField:
        if self.max_tokens_field is not None:
            return self.max_tokens_field
        return "max_completion_tokens" if urlsplit(self.base_url).hostname in OPENAI_HOSTS else "max_tokens"

    @property
    def display_url(self) -> str:
        """The base URL without user info or query, safe for messages and logs."""
        url = urlsplit(self.base_url)
        host = f"[{url.hostname}]" if ":" in (url.hostname or "") else url.hostname
        port = f":{url.port}" if url.port else ""
        return f"{url.scheme}://{host}{port}{url.path}"


def _is_http_url(text: str) -> bool:
    try:
        url = urlsplit(text)
        url.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)


def default_api_key_env(name: str) -> str:
    return f"SPINDLE_PROVIDER_{re.sub(r'[^A-Z0-9]', '_', name.upper())}_API_KEY"


_Number = TypeVar("_Number", int, float)
_FLOAT_OPTIONS = ("timeout", "stall_timeout", "initial_backoff", "max_backoff")
_SPEC_OPTIONS = ("api_key_env", *_FLOAT_OPTIONS, "max_retries", "max_tokens_field")


def parse_provider_spec(spec: str, environ: Mapping[str, str] | None = None) -> ProviderConfig:
    """Read `NAME=BASE_URL[,OPTION=VALUE...]`, e.g. `openai=https://api.openai.com/v1,timeout=30`.

    Options: api_key_env (default SPINDLE_PROVIDER_<NAME>_API_KEY), timeout, stall_timeout,
    max_retries, initial_backoff, max_backoff, max_tokens_field. The API key is read from
    `environ[api_key_env]` (default: the process environment), never from the spec itself; a
    provider whose default variable is unset runs without a key (Ollama, llama.cpp), while a
    variable named explicitly must be set.
    The base URL may contain '=' but not ','.
    """
    name, sep, rest = spec.strip().partition("=")
    if not sep or not rest:
        raise ValueError(f"provider spec {spec!r}: expected NAME=BASE_URL[,OPTION=VALUE...]")
    name = name.strip()
    environ = os.environ if environ is None else environ
    base_url, *option_items = [item.strip() for item in rest.split(",")]
    options = _parse_options(name, option_items)
    key_env = options.pop("api_key_env", "")
    api_key = environ.get(key_env or default_api_key_env(name), "")
    if key_env and not api_key:
        raise ValueError(f"provider {name}: environment variable {key_env} is not set")
    settings: dict[str, Any] = {}
    if "max_retries" in options:
        settings["max_retries"] = _parse_number(name, "max_retries", options.pop("max_retries"), int)
    if "max_tokens_field" in options:
        settings["max_tokens_field"] = _parse_max_tokens_field(name, options.pop("max_tokens_field"))
    settings |= {option: _parse_number(name, option, value, float) for option, value in options.items()}
    return ProviderConfig(
        name=name,
        base_url=base_url,
        api_key=api_key,
        api_key_env=key_env or default_api_key_env(name),
        **settings,
    )


def _parse_options(name: str, items: Sequence[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if key == "api_key":
            raise ValueError(
                f"provider {name}: API keys are read from the environment; use api_key_env=VARIABLE"
            )
        if not sep or key not in _SPEC_OPTIONS:
            raise ValueError(f"provider {name}: unknown option {item!r}; known: {', '.join(_SPEC_OPTIONS)}")
        options[key] = value.strip()
    return options


def _parse_number(name: str, option: str, value: str, kind: Callable[[str], _Number]) -> _Number:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"provider {name}: {option}={value!r} is not a number") from None


def _parse_max_tokens_field(name: str, value: str) -> MaxTokensField:
    for choice in get_args(MaxTokensField):
        if value == choice:
            return choice
    raise ValueError(f"provider {name}: max_tokens_field must be max_tokens or max_completion_tokens")
