"""Listeners that record what they saw into a History and resume from last index + 1,
across a server's crash or restart (on a new address, through new stubs)."""

from __future__ import annotations

import grpc

from spindle.v1 import run_pb2
from support.invariants import History, Seen
from support.stubs import Stubs


class Follower:
    """Follows one run; `follow` reads until the stream ends and says how it ended."""

    def __init__(self, history: History, run_id: str) -> None:
        self.seen: Seen = history.listener(run_id)
        self.run_id = run_id

    @property
    def next_index(self) -> int:
        return self.seen.events[-1].index + 1 if self.seen.events else 0

    def follow(self, stubs: Stubs) -> grpc.StatusCode:
        request = run_pb2.ListenRunRequest(run_id=self.run_id, events_start_idx=self.next_index)
        try:
            for event in stubs.runs.Listen(request, timeout=120):
                self.seen.events.append(event)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK
