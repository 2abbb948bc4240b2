"""A scripted OpenAI Chat Completions server for tests, on 127.0.0.1 and a free port.

Tests queue replies (`enqueue`), point a client at `base_url`, and then assert on what the
server received (`requests`). Streams are real SSE over HTTP/1.1 chunked encoding, with chunks
shaped exactly as OpenAI sends them (see the builders at the bottom). Only
`POST /v1/chat/completions` is served: a `StreamReply` answers a request with stream=true, a
`CompletionReply` one without; anything else gets a 404 or 400 with OpenAI's error body.

    with FakeOpenAI() as fake:
        fake.enqueue(text_stream("Hel", "lo"))
        ...  # call fake.base_url
        assert fake.requests[0].body["messages"] == [...]
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
# A stalled stream is given up on after this long even if the client never disconnects,
# so that a broken test cannot hang the server thread forever.
MAX_STALL_SECONDS = 30.0


@dataclass(frozen=True)
class StreamReply:
    """A 200 SSE stream of `chunks` (dicts sent as JSON, strings sent as raw SSE lines).

    stall_after: send that many chunks, then hold the connection open without writing
    until the client closes it. drop_after: send that many chunks, then close the socket
    without finishing the chunked body. Otherwise the stream ends with `data: [DONE]` (unless
    `done` is false: then the body just ends, as llama.cpp's server may end it).
    chunk_delay: seconds to wait before each chunk after the first (a model that streams slowly).
    """

    chunks: Sequence[Mapping[str, Any] | str]
    stall_after: int | None = None
    drop_after: int | None = None
    done: bool = True
    chunk_delay: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorReply:
    """A non-2xx response with a JSON (dict) or plain text (str) body."""

    status: int
    body: Mapping[str, Any] | str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CompletionReply:
    """A 200 `chat.completion` JSON body, the answer to a request without streaming."""

    body: Mapping[str, Any]


@dataclass(frozen=True)
class Disconnect:
    """Close the connection without sending any response."""


Reply = StreamReply | CompletionReply | ErrorReply | Disconnect


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]
    # Set when the client closed the connection while this request's stream was stalled.
    client_closed: threading.Event = field(default_factory=threading.Event)


class FakeOpenAI:
    def __init__(self) -> None:
        self._replies: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        # A short poll interval makes close() quick: shutdown() waits for the next poll.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, name="fake-openai", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def reset(self) -> None:
        """Forget queued replies and recorded requests (one server shared by several tests)."""
        with self._lock:
            self._replies.clear()
            self._requests.clear()

    @property
    def pending_replies(self) -> int:
        """Queued replies nobody asked for yet."""
        with self._lock:
            return len(self._replies)

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _record(self, request: RecordedRequest) -> Reply | None:
        with self._lock:
            self._requests.append(request)
            return self._replies.popleft() if self._replies else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not delay close()

    def __init__(self, address: tuple[str, int], handler: type[_Handler], fake: FakeOpenAI) -> None:
        super().__init__(address, handler)
        self.fake = fake

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hang up; that is expected
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path != CHAT_COMPLETIONS_PATH:
            self._send_error(ErrorReply(404, error_body(f"no route {self.path}", "invalid_request_error")))
            return
        body = json.loads(raw or b"{}")
        headers = {name.lower(): value for name, value in self.headers.items()}
        recorded = RecordedRequest("POST", self.path, headers, body)
        reply = self.server.fake._record(recorded)
        if reply is None:
            self._send_error(ErrorReply(500, error_body("no scripted reply queued", "server_error")))
        elif isinstance(reply, Disconnect):
            self.close_connection = True
        elif isinstance(reply, ErrorReply):
            self._send_error(reply)
        elif isinstance(reply, StreamReply) != bool(body.get("stream")):
            mismatch = f"the fake has a {type(reply).__name__} queued but got stream={body.get('stream')}"
            self._send_error(ErrorReply(400, error_body(mismatch, "invalid_request_error")))
        elif isinstance(reply, CompletionReply):
            self._send_json(200, reply.body, {"x-request-id": "req_fake"})
        else:
            self._send_stream(reply, recorded)

    def _send_error(self, reply: ErrorReply) -> None:
        self._send_json(reply.status, reply.body, reply.headers)

    def _send_json(self, status: int, body: Mapping[str, Any] | str, headers: Mapping[str, str]) -> None:
        is_json = not isinstance(body, str)
        payload = (json.dumps(body) if is_json else str(body)).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json" if is_json else "text/plain")
        self.send_header("content-length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _send_stream(self, reply: StreamReply, recorded: RecordedRequest) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("x-request-id", "req_fake")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        cut = reply.stall_after if reply.stall_after is not None else reply.drop_after
        for position, chunk in enumerate(reply.chunks[:cut]):
            if position and reply.chunk_delay:
                time.sleep(reply.chunk_delay)
            self._write_event(chunk if isinstance(chunk, str) else f"data: {json.dumps(chunk)}")
        if reply.stall_after is not None:
            self._stall(recorded)
            return
        if reply.drop_after is not None:
            self.close_connection = True
            return
        if reply.done:
            self._write_event("data: [DONE]")
        self._write_http_chunk(b"")  # end of the chunked body

    def _write_event(self, event: str) -> None:
        self._write_http_chunk(f"{event}\n\n".encode())

    def _write_http_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stall(self, recorded: RecordedRequest) -> None:
        """Write nothing more; note when the client hangs up."""
        self.close_connection = True
        deadline = time.monotonic() + MAX_STALL_SECONDS
        while time.monotonic() < deadline and not self.server.fake._stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.02)
            if readable and not self._peek():
                recorded.client_closed.set()
                return

    def _peek(self) -> bytes:
        try:
            return self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return b""


# --- Builders for what OpenAI sends --------------------------------------------------------

CHUNK_ID = "chatcmpl-fake123"
MODEL = "gpt-fake"


def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk` envelope, as streamed with include_usage=true."""
    return {
        "id": CHUNK_ID,
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
        "choices": choices,
        "usage": usage,
    }


def delta_chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])


def role_chunk() -> dict[str, Any]:
    return delta_chunk({"role": "assistant", "content": "", "refusal": None})


def text_chunk(text: str) -> dict[str, Any]:
    return delta_chunk({"content": text})


def tool_call_chunk(
    index: int, *, call_id: str | None = None, name: str | None = None, arguments: str = ""
) -> dict[str, Any]:
    """A tool-call piece: the first one of a call carries id, type and name; later ones only arguments."""
    piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id is not None:
        piece["id"] = call_id
        piece["type"] = "function"
    if name is not None:
        piece["function"]["name"] = name
    return delta_chunk({"tool_calls": [piece]})


def finish_chunk(reason: str) -> dict[str, Any]:
    return delta_chunk({}, finish_reason=reason)


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk when include_usage is set: no choices, only usage."""
    return chunk(
        [],
        usage={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
    )


def text_stream(
    *pieces: str,
    finish_reason: str = "stop",
    usage: tuple[int, int] = (12, 3),
    stall_after: int | None = None,
    chunk_delay: float = 0.0,
) -> StreamReply:
    chunks = [role_chunk(), *(text_chunk(piece) for piece in pieces), finish_chunk(finish_reason)]
    return StreamReply([*chunks, usage_chunk(*usage)], stall_after=stall_after, chunk_delay=chunk_delay)


def tool_calls_stream(
    calls: Sequence[tuple[str, str, Sequence[str]]], usage: tuple[int, int] = (40, 18)
) -> StreamReply:
    """Calls as (id, name, argument pieces), streamed one after another like OpenAI does."""
    chunks: list[dict[str, Any]] = [role_chunk()]
    for index, (call_id, name, argument_pieces) in enumerate(calls):
        chunks.append(tool_call_chunk(index, call_id=call_id, name=name))
        chunks.extend(tool_call_chunk(index, arguments=piece) for piece in argument_pieces)
    return StreamReply([*chunks, finish_chunk("tool_calls"), usage_chunk(*usage)])


def empty_stream(*, done: bool = True) -> StreamReply:
    """A 200 stream with no chunk at all: what llama.cpp's server may send for tools and `auto`."""
    return StreamReply([], done=done)


def completion(
    content: str | None,
    *,
    tool_calls: Sequence[tuple[str, str, str]] = (),
    finish_reason: str = "stop",
    usage: tuple[int, int] = (12, 3),
) -> CompletionReply:
    """A whole `chat.completion`, as sent without streaming; tool calls as (id, name, arguments)."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            for call_id, name, arguments in tool_calls
        ]
    prompt_tokens, completion_tokens = usage
    return CompletionReply(
        {
            "id": CHUNK_ID,
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": MODEL,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


def error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_reply(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> ErrorReply:
    return ErrorReply(status, error_body(message, error_type, code), dict(headers or {}))
