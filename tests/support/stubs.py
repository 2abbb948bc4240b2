"""The generated stubs over one channel, plus helpers to read rich error details."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

from spindle.v1 import (
    assistant_pb2,
    assistant_pb2_grpc,
    message_pb2,
    message_pb2_grpc,
    run_pb2,
    run_pb2_grpc,
    thread_pb2,
    thread_pb2_grpc,
)

TERMINAL = {run_pb2.COMPLETED, run_pb2.FAILED, run_pb2.CANCELLED, run_pb2.INCOMPLETE, run_pb2.EXPIRED}


@dataclass
class Stubs:
    channel: grpc.Channel
    assistants: assistant_pb2_grpc.AssistantServiceStub
    threads: thread_pb2_grpc.ThreadServiceStub
    messages: message_pb2_grpc.MessageServiceStub
    runs: run_pb2_grpc.RunServiceStub

    @classmethod
    def connect(cls, address: str, api_key: str | None = None) -> Stubs:
        channel = grpc.insecure_channel(address)
        if api_key is not None:
            channel = grpc.intercept_channel(channel, BearerKey(api_key))
        return cls(
            channel,
            assistant_pb2_grpc.AssistantServiceStub(channel),
            thread_pb2_grpc.ThreadServiceStub(channel),
            message_pb2_grpc.MessageServiceStub(channel),
            run_pb2_grpc.RunServiceStub(channel),
        )

    def close(self) -> None:
        self.channel.close()

    # ---- shortcuts ------------------------------------------------------------------------

    def assistant(self, **fields: object) -> assistant_pb2.Assistant:
        request = assistant_pb2.CreateAssistantRequest(**fields)  # type: ignore[arg-type]
        return self.assistants.Create(request, timeout=10)

    def tool_assistant(self, *names: str) -> assistant_pb2.Assistant:
        request = assistant_pb2.CreateAssistantRequest(name="tools")
        for name in names or ("get_weather",):
            request.tools.add().function.name = name
        return self.assistants.Create(request, timeout=10)

    def thread(self, *texts: str) -> thread_pb2.Thread:
        request = thread_pb2.CreateThreadRequest()
        for text in texts:
            request.messages.add(text=text)
        return self.threads.Create(request, timeout=10)

    def say(self, thread_id: str, text: str) -> message_pb2.Message:
        return self.messages.Create(
            message_pb2.CreateMessageRequest(thread_id=thread_id, text=text), timeout=10
        )

    def run(self, assistant_id: str, thread_id: str, **fields: object) -> run_pb2.Run:
        request = run_pb2.CreateRunRequest(assistant_id=assistant_id, thread_id=thread_id, **fields)  # type: ignore[arg-type]
        return self.runs.Create(request, timeout=10)

    def start(
        self, text: str, assistant: assistant_pb2.Assistant | None = None, **fields: object
    ) -> run_pb2.Run:
        """A new thread with one message, and a run on it."""
        assistant = assistant or self.assistant(name="echo")
        thread = self.thread(text)
        return self.run(assistant.id, thread.id, **fields)

    def wait(self, run_id: str, timeout: float = 20.0) -> run_pb2.Run:
        request = run_pb2.WaitRunRequest(run_id=run_id)
        request.timeout.FromNanoseconds(int(timeout * 1e9))
        return self.runs.Wait(request, timeout=timeout + 5)

    def wait_for(self, run_id: str, statuses: set[int], timeout: float = 20.0) -> run_pb2.Run:
        deadline = time.monotonic() + timeout
        while True:
            run = self.runs.Get(run_pb2.GetRunRequest(run_id=run_id), timeout=10)
            if run.status in statuses or time.monotonic() > deadline:
                return run
            time.sleep(0.01)

    def events(self, run_id: str, start: int = 0, timeout: float = 30.0) -> list[run_pb2.StreamEvent]:
        request = run_pb2.ListenRunRequest(run_id=run_id, events_start_idx=start)
        return list(self.runs.Listen(request, timeout=timeout))


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends `authorization: Bearer KEY` on every call."""

    def __init__(self, key: str) -> None:
        self._metadata = (("authorization", f"Bearer {key}"),)

    def _with_key(self, details):  # type: ignore[no-untyped-def]
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_key(details), request)


def error_details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None, list[tuple[str, str]]]:
    """ErrorInfo and BadRequest field violations from the grpc-status-details-bin trailer."""
    info = None
    violations: list[tuple[str, str]] = []
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend((v.field, v.description) for v in bad.field_violations)
    return info, violations
