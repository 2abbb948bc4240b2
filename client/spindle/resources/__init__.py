"""The API's resources, each as a sync class and its async twin."""

from spindle.resources.assistants import Assistants, AsyncAssistants
from spindle.resources.async_runs import AsyncRuns
from spindle.resources.messages import AsyncMessages, Messages
from spindle.resources.runs import Runs
from spindle.resources.threads import AsyncThreads, Threads

__all__ = [
    "Assistants",
    "AsyncAssistants",
    "AsyncMessages",
    "AsyncRuns",
    "AsyncThreads",
    "Messages",
    "Runs",
    "Threads",
]
