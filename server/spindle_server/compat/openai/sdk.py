"""The `openai` package's Assistants types, imported at first use.

openai.types.beta takes about half a second to import: a server start (and a restart under
connected clients) should not pay it for an API that may never be called.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

BETA = "openai.types.beta"


@functools.cache
def model(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def checked(module: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` validated by the SDK's own model (a missing or mistyped field raises), as JSON."""
    rendered: dict[str, Any] = model(module, name).model_validate(body).model_dump(mode="json")
    return rendered
