"""RunService: create, inspect, cancel and resume runs; Wait and Listen follow them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc

from spindle.v1 import assistant_pb2, run_pb2, run_pb2_grpc
from spindle_server import clock, faults, ids, metrics
from spindle_server.api import context, idempotency, registration, validation
from spindle_server.api.errors import quota_exceeded
from spindle_server.api.paging import next_page_token, page_query
from spindle_server.api.threads import messages_from_inputs
from spindle_server.api.validation import Validator
from spindle_server.broadcast import EventHub, frame
from spindle_server.engine import events, transitions
from spindle_server.engine.engine import Engine, find_tool_step, pending_tool_step
from spindle_server.limits import DEFAULT_LIMITS, Limits
from spindle_server.models.registry import ModelRegistry, UnknownModelError
from spindle_server.store.base import TERMINAL_STATUSES, RequestKey, RunFilter, Store
from spindle_server.store.errors import StateError

DEFAULT_WAIT_SECONDS = 30.0
MAX_WAIT_SECONDS = 600.0
# Every commit of this process wakes its listeners; this re-read is only a safety net (a store
# written by another process), so it is rare: an idle listener costs nothing in between.
IDLE_RECHECK_SECONDS = 30.0
WAIT_READY = TERMINAL_STATUSES | {run_pb2.TOOL_CALLS}
# How long a run's Create holds its feed (and the events published meanwhile) for the listener
# that follows its answer: the first delta is then sent from memory.
FEED_HOLD_SECONDS = 2.0


def _deadline_margin(remaining: float) -> float:
    """How long before the caller's deadline Wait answers: a fifth of the time left, between
    50 ms and 1 s (a fixed 50 ms lost the race on a loaded machine)."""
    return min(max(remaining * 0.2, 0.05), 1.0)


class ListenStreams:
    """Listen streams open per project on this server, held under --max-listen-streams-per-project."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[str, int] = {}

    def open(self, project: str) -> Callable[[], None]:
        """Count one more stream of `project` (or refuse it); returns its release, safe to call twice."""
        count = self._open.get(project, 0)
        if count >= self._limit:
            raise quota_exceeded(
                "LISTEN_STREAMS_LIMIT",
                f"projects/{project}",
                f"{count} Listen streams are open; at most {self._limit} are allowed at once",
                self._limit,
            )
        self._open[project] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._open[project] - 1
                if left:
                    self._open[project] = left
                else:
                    del self._open[project]

        return release


class RunServicer(run_pb2_grpc.RunServiceServicer):
    def __init__(
        self,
        store: Store,
        engine: Engine,
        hub: EventHub,
        models: ModelRegistry,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._store = store
        self._engine = engine
        self._hub = hub
        self._models = models
        self._limits = limits
        self._listens = ListenStreams(limits.max_listen_streams_per_project)

    # ---- create ---------------------------------------------------------------------------

    async def Create(self, request: run_pb2.CreateRunRequest, _: grpc.aio.ServicerContext) -> run_pb2.Run:
        v = Validator(self._limits)
        v.resource_id("assistant_id", request.assistant_id, "asst")
        v.resource_id("thread_id", request.thread_id, "thread")
        _check_overrides(v, request)
        project = context.project()
        messages = messages_from_inputs(
            v,
            "additional_messages",
            request.additional_messages,
            request.thread_id,
            project,
            validation.MAX_ADDITIONAL_MESSAGES,
        )
        v.check()
        assistant = await self._store.get_assistant(project, request.assistant_id)
        run = self._effective_run(request, assistant, project)
        if not (request.override_tools or request.tools):
            # The assistant's tools, checked when it was saved, maybe under a higher limit.
            v.tool_count("tools", len(run.tools))
        v.tool_choice("tool_choice", run.tool_choice, {t.function.name for t in run.tools})
        try:
            self._models.resolve(run.model)
        except UnknownModelError as exc:
            v.add("model", str(exc))
        v.check()

        async def create(record: RequestKey | None) -> run_pb2.Run:
            now = clock.now()
            run.id = ids.new_id("run")
            run.created_at.CopyFrom(clock.timestamp(now))
            run.updated_at.CopyFrom(run.created_at)
            deadline = now + self._engine.config.run_timeout
            run.expires_at.CopyFrom(clock.timestamp(deadline))
            for message in messages:
                message.run_id = ""
            # The engine inserts it, and claims it in that transaction when it has a free slot.
            # The run's feed is held from before its insert: the listener that follows this
            # answer finds the run's first events in memory (BENCHMARKS.md, listen-fanout).
            feed = self._hub.hold(run.id)
            started = False
            try:
                result = await self._engine.create_run(
                    project,
                    run,
                    messages,
                    deadline,
                    [events.status_change(run, "queued")],
                    record=record,
                    max_active_runs=self._limits.max_active_runs_per_project,
                )
                started = result.claimed is not None
            finally:
                # Held on only for a run this server started: its events are published here.
                self._hub.let_go(run.id, feed, project if started else None, FEED_HOLD_SECONDS)
            return result.run

        created = await idempotency.once(self._store, project, "runs.create", request, run_pb2.Run, create)
        context.note_run(created.id)
        return created

    def _effective_run(
        self, request: run_pb2.CreateRunRequest, assistant: assistant_pb2.Assistant, project: str
    ) -> run_pb2.Run:
        """The assistant's configuration with this run's overrides applied."""
        options = assistant.completion_options
        truncation = assistant.prompt_truncation_options
        run = run_pb2.Run(
            assistant_id=assistant.id,
            thread_id=request.thread_id,
            created_by=project,
            status=run_pb2.PENDING,
            labels=request.labels,
            model=request.model if request.HasField("model") and request.model else assistant.model,
            instructions=request.instructions if request.HasField("instructions") else assistant.instructions,
            additional_instructions=request.additional_instructions,
            tools=request.tools if (request.override_tools or request.tools) else assistant.tools,
            parallel_tool_calls=request.parallel_tool_calls
            if request.HasField("parallel_tool_calls")
            else True,
        )
        if request.HasField("tool_choice"):
            run.tool_choice.CopyFrom(request.tool_choice)
        if request.HasField("truncation_strategy"):
            run.truncation_strategy.CopyFrom(request.truncation_strategy)
        elif truncation.HasField("truncation_strategy"):
            run.truncation_strategy.CopyFrom(truncation.truncation_strategy)
        if request.HasField("response_format"):
            run.response_format.CopyFrom(request.response_format)
        elif assistant.HasField("response_format"):
            run.response_format.CopyFrom(assistant.response_format)
        run.model = run.model or self._models.default_model
        if request.HasField("temperature"):
            run.temperature = request.temperature
        elif options.HasField("temperature"):
            run.temperature = options.temperature
        if request.HasField("top_p"):
            run.top_p = request.top_p
        elif options.HasField("top_p"):
            run.top_p = options.top_p
        if request.HasField("max_completion_tokens"):
            run.max_completion_tokens = request.max_completion_tokens
        elif options.HasField("max_tokens"):
            run.max_completion_tokens = options.max_tokens
        if request.HasField("max_prompt_tokens"):
            run.max_prompt_tokens = request.max_prompt_tokens
        elif truncation.HasField("max_prompt_tokens"):
            run.max_prompt_tokens = truncation.max_prompt_tokens
        return run

    # ---- read -----------------------------------------------------------------------------

    async def Get(self, request: run_pb2.GetRunRequest, ctx: grpc.aio.ServicerContext) -> run_pb2.Run:
        return run_pb2.Run.FromString(await self.get_wire(request, ctx))

    async def get_wire(self, request: run_pb2.GetRunRequest, _: grpc.aio.ServicerContext) -> bytes:
        """Get as gRPC serves it: the run's stored bytes (a serialized Run), sent as they are
        (no response serializer), without a parse and a serialization of the same Run in between."""
        run_id = request.run_id
        project = context.current_project.get()
        # From the store's memory first: a kept run's id is well-formed, so the check is
        # needed only for what the store must read (BENCHMARKS.md, rpc-speed).
        body = self._store.kept_run_body(project, run_id)
        context.current_run_id.set(run_id)  # context.note_run, inlined on the hottest call
        if body is None:
            if not _well_formed_run_id(run_id):
                validation.require_id("run_id", run_id, "run")  # raises, with the violation
            return await self._store.get_run_body(project, run_id)
        return body

    async def GetLastByThread(
        self, request: run_pb2.GetLastRunByThreadRequest, _: grpc.aio.ServicerContext
    ) -> run_pb2.Run:
        v = Validator()
        v.resource_id("thread_id", request.thread_id, "thread")
        v.check()
        return await self._store.get_last_run(context.project(), request.thread_id)

    async def List(
        self, request: run_pb2.ListRunsRequest, _: grpc.aio.ServicerContext
    ) -> run_pb2.ListRunsResponse:
        v = Validator()
        v.resource_id("thread_id", request.thread_id, "thread", required=False)
        v.resource_id("assistant_id", request.assistant_id, "asst", required=False)
        for index, status in enumerate(request.statuses):
            v.enum(f"statuses[{index}]", status, run_pb2.RunStatus, allow_unspecified=False)
        v.labels("labels", request.labels)
        labels = tuple(sorted(request.labels.items()))
        statuses = frozenset(request.statuses)
        scope = f"runs:{request.thread_id}:{request.assistant_id}:{sorted(statuses)}:{labels}"
        query = page_query(v, request.page_size, request.page_token, request.order, scope)
        flt = RunFilter(request.thread_id, request.assistant_id, statuses, labels)
        page = await self._store.list_runs(context.project(), flt, query)
        return run_pb2.ListRunsResponse(runs=page.items, next_page_token=next_page_token(page, query, scope))

    async def ListSteps(
        self, request: run_pb2.ListRunStepsRequest, _: grpc.aio.ServicerContext
    ) -> run_pb2.ListRunStepsResponse:
        v = Validator()
        v.resource_id("run_id", request.run_id, "run")
        scope = f"steps:{request.run_id}"
        query = page_query(v, request.page_size, request.page_token, request.order, scope)
        context.note_run(request.run_id)
        page = await self._store.list_steps(context.project(), request.run_id, query)
        return run_pb2.ListRunStepsResponse(
            steps=page.items, next_page_token=next_page_token(page, query, scope)
        )

    # ---- change ---------------------------------------------------------------------------

    async def Update(self, request: run_pb2.UpdateRunRequest, _: grpc.aio.ServicerContext) -> run_pb2.Run:
        v = Validator()
        v.resource_id("run_id", request.run_id, "run")
        for path in request.update_mask.paths:
            if path != "labels":
                v.add("update_mask", f"{path!r} cannot be updated; only 'labels' can")
        v.labels("labels", request.labels)
        v.request_id(request.request_id)
        v.check()
        project = context.project()
        context.note_run(request.run_id)

        async def update(record: RequestKey | None) -> run_pb2.Run:
            return await self._store.update_run_labels(
                project, request.run_id, dict(request.labels), record=record
            )

        return await idempotency.once(self._store, project, "runs.update", request, run_pb2.Run, update)

    async def Cancel(self, request: run_pb2.CancelRunRequest, _: grpc.aio.ServicerContext) -> run_pb2.Run:
        v = Validator()
        v.resource_id("run_id", request.run_id, "run")
        v.request_id(request.request_id)
        v.check()
        project = context.project()
        context.note_run(request.run_id)

        async def cancel(record: RequestKey | None) -> run_pb2.Run:
            run = await self._store.get_run(project, request.run_id)
            tool_step = await pending_tool_step(self._store, run)
            mutation = transitions.request_cancel(clock.now(), tool_step)
            result = await self._store.mutate_run(run.id, mutation, project=project, record=record)
            if result.run.status == run_pb2.CANCELLING:
                self._engine.cancel_local(run.id)
            return result.run

        return await idempotency.once(self._store, project, "runs.cancel", request, run_pb2.Run, cancel)

    async def SubmitToolResults(
        self, request: run_pb2.SubmitToolResultsRequest, _: grpc.aio.ServicerContext
    ) -> run_pb2.Run:
        results = _check_tool_results(request, self._limits)
        project = context.project()
        context.note_run(request.run_id)

        async def submit(record: RequestKey | None) -> run_pb2.Run:
            run = await self._store.get_run(project, request.run_id)
            steps = await self._store.run_steps(run.id)
            if run.status != run_pb2.TOOL_CALLS:
                if _already_submitted(steps, results):
                    return run  # a repeat of a submission that went through: nothing to do
                raise StateError(
                    "RUN_NOT_WAITING_FOR_TOOLS",
                    f"run {run.id} is {run_pb2.RunStatus.Name(run.status)}, not waiting for tool results",
                )
            step = find_tool_step(steps, run)
            if step is None:
                raise StateError("RUN_CHANGED", f"run {run.id} changed while submitting; retry")
            deadline = transitions.run_deadline(run, self._engine.config.run_timeout)
            mutation = transitions.submit_tool_results(clock.now(), results, step, deadline)
            result = await self._store.mutate_run(run.id, mutation, project=project, record=record)
            self._engine.wake()
            return result.run

        return await idempotency.once(
            self._store, project, "runs.submit_tool_results", request, run_pb2.Run, submit
        )

    # ---- follow ---------------------------------------------------------------------------

    async def Wait(self, request: run_pb2.WaitRunRequest, ctx: grpc.aio.ServicerContext) -> run_pb2.Run:
        v = Validator()
        v.resource_id("run_id", request.run_id, "run")
        timeout = DEFAULT_WAIT_SECONDS
        if request.HasField("timeout"):
            timeout = request.timeout.ToNanoseconds() / 1e9
            if not 0 <= timeout <= MAX_WAIT_SECONDS:
                v.add("timeout", f"must be between 0 and {MAX_WAIT_SECONDS:g} seconds")
        v.check()
        project = context.project()
        context.note_run(request.run_id)
        remaining = ctx.time_remaining()
        if remaining is not None:
            # Answer with the run before the caller's own deadline rather than let it fail, early
            # enough for the answer to cross a busy loop and the network in time.
            timeout = max(min(timeout, remaining - _deadline_margin(remaining)), 0.0)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        with self._hub.subscribe(request.run_id) as feed:
            while True:
                changed = feed.status_changed()
                run = await self._store.get_run(project, request.run_id)
                left = give_up - loop.time()
                if run.status in WAIT_READY or left <= 0:
                    return run
                await asyncio.wait({changed}, timeout=min(left, IDLE_RECHECK_SECONDS))

    async def Listen(
        self, request: run_pb2.ListenRunRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[run_pb2.StreamEvent]:
        """The run's events as messages (the facades build on these)."""
        async with contextlib.aclosing(self._follow(request, ctx, wire=False)) as stream:
            async for events in stream:
                for event in events:
                    yield event

    async def write_stream(
        self, request: run_pb2.ListenRunRequest, ctx: grpc.aio.ServicerContext, *, batches: bool
    ) -> None:
        """gRPC's Listen, or ListenBatches with `batches`: the same events as the bytes of the
        shared log, serialized once for every listener (ListenBatches' framed as
        StreamEventBatch messages of up to BATCH_BYTES), each written with `ctx.write`. A
        coroutine handler (grpc.aio's reader/writer API): a message costs one await, not a step
        of each generator between the servicer and gRPC. The count goes to the access log."""
        write = ctx.write
        sent = 0
        try:
            async with contextlib.aclosing(self._follow(request, ctx, wire=True, batches=batches)) as stream:
                async for messages in stream:
                    for message in messages:
                        await write(message)
                        sent += 1
        finally:
            context.note_messages(sent)

    async def ListenBatches(
        self, request: run_pb2.ListenRunRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[run_pb2.StreamEventBatch]:
        """ListenBatches as messages (gRPC itself sends write_stream's bytes)."""
        async with contextlib.aclosing(self._follow(request, ctx, wire=True, batches=True)) as stream:
            async for messages in stream:
                for data in messages:
                    yield run_pb2.StreamEventBatch.FromString(data)

    async def create_and_write(
        self, request: run_pb2.CreateRunRequest, ctx: grpc.aio.ServicerContext
    ) -> None:
        """gRPC's CreateAndListen: Create, then ListenBatches of the run from index 0 on the
        same call (its feed, held by Create, answers from memory). An error before the run
        exists is Create's own, raised before any message."""
        run = await self._create_with_room(request, ctx)
        await self.write_stream(run_pb2.ListenRunRequest(run_id=run.id), ctx, batches=True)

    async def CreateAndListen(
        self, request: run_pb2.CreateRunRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[run_pb2.StreamEventBatch]:
        """CreateAndListen as messages (gRPC itself sends create_and_write's bytes)."""
        run = await self._create_with_room(request, ctx)
        async for batch in self.ListenBatches(run_pb2.ListenRunRequest(run_id=run.id), ctx):
            yield batch

    async def _create_with_room(
        self, request: run_pb2.CreateRunRequest, ctx: grpc.aio.ServicerContext
    ) -> run_pb2.Run:
        """Create, holding a Listen slot of the project meanwhile: with no room for the stream,
        it is refused before a run is made. The slot is given back for the stream's follower to
        take at once: no await comes between, so no other stream can take it first."""
        release = self._listens.open(context.project())
        try:
            return await self.Create(request, ctx)
        finally:
            release()

    async def _follow(
        self,
        request: run_pb2.ListenRunRequest,
        ctx: grpc.aio.ServicerContext,
        *,
        wire: bool,
        batches: bool = False,
    ) -> AsyncGenerator[Sequence[Any], None]:
        """The stream's messages, a sequence of them at a time (a replayed block, or what was
        published since the listener's last wake-up): its caller's loop over them is the only
        per-message work, with no generator step per message."""
        v = Validator()
        v.resource_id("run_id", request.run_id, "run")
        if request.events_start_idx < 0:
            v.add("events_start_idx", "must not be negative")
        v.check()
        context.note_run(request.run_id)
        project = context.project()
        release = self._listens.open(project)
        # However the call ends (its end, an error, the client gone), the slot is given back:
        # the finally below when the generator is closed, the callback if it never is.
        ctx.add_done_callback(lambda _: release())
        try:
            # Only the id and status are kept: an idle stream does not hold the whole Run.
            run_id = request.run_id
            next_index = request.events_start_idx
            stale = False  # woken without finding events: the run's status may have moved on
            fresh = False  # the log read anew from the store, not through a read in flight
            load = functools.partial(self._store.read_event_wires, run_id)
            changed: asyncio.Future[None] | None = None
            with self._hub.subscribe(run_id) as feed, metrics.LISTEN_STREAMS.track_inprogress():
                # A run held by its Create needs no read to be found (nor its status, until
                # there is nothing to send): its events are in the feed's tail.
                status = None if feed.known(project) else (await self._store.get_run(project, run_id)).status
                try:
                    while True:
                        changed = feed.changed(changed)
                        # The tail answers without a coroutine (each live event, each listener).
                        batch = feed.cached(next_index, wire, framed=batches, fresh=fresh)
                        if batch is None:
                            batch = await feed.read(next_index, load, wire, framed=batches, fresh=fresh)
                        if batch:
                            final = feed.final  # the terminal event ends the stream
                            ended = final is not None and final < next_index + len(batch)
                            if final is not None and ended:
                                batch = batch[: final + 1 - next_index]
                            # A lone framed event is the whole message, as it is.
                            yield list(join_batches(batch)) if batches and len(batch) > 1 else batch
                            if ended:
                                return
                            next_index += len(batch)
                            stale = False  # woken by events: the run's status is theirs to tell
                            continue
                        if stale or status is None:
                            stale = False
                            status = (await self._store.get_run(project, run_id)).status
                        if status in TERMINAL_STATUSES:
                            if fresh:
                                return  # asked to start past the terminal event
                            # Its terminal event was committed with this status, maybe after our read
                            # above began and before its publish reached the feed: read once more,
                            # from the store itself, before concluding we started past it.
                            fresh = True
                            continue
                        if faults.ENABLED:  # tests steer a publish against a listener about to wait
                            await faults.reached("listen.idle")
                        await changed  # this listener's own: cancelling it touches no other
                        stale = True
                finally:
                    feed.forget(changed)  # it would wait in the feed until the next publish
        finally:
            release()


BATCH_BYTES = 1 << 20


def frame_batches(wires: Sequence[bytes]) -> Iterator[bytes]:
    """StreamEventBatch messages of up to BATCH_BYTES each, built from the events' bytes
    without decoding them."""
    return join_batches([frame(wire) for wire in wires])


def join_batches(framed: Sequence[bytes]) -> Iterator[bytes]:
    """StreamEventBatch messages of up to BATCH_BYTES each from events framed by the feed
    (`broadcast.frame`, made once for every listener). A lone event is its framed bytes as they
    are: the same object for every listener in step, no copy."""
    if len(framed) == 1:
        yield framed[0]
        return
    parts: list[bytes] = []
    size = 0
    for data in framed:
        if parts and size + len(data) > BATCH_BYTES:
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(data)
        size += len(data)
    if parts:
        yield b"".join(parts)


def add_to_server(servicer: RunServicer, server: grpc.aio.Server) -> None:
    """RunService as generated, except Get, Listen, ListenBatches and CreateAndListen: they send
    the stored run's and the shared log's bytes as they are, registered without a serializer (grpc
    sends bytes as they are, as a bare bytes method does, without a Python call per message)."""

    def replace(handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, batches in (("Listen", False), ("ListenBatches", True)):
            # A partial, not a wrapper: no coroutine frame more per open stream.
            behavior = functools.partial(servicer.write_stream, batches=batches)
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                behavior, request_deserializer=handlers[name].request_deserializer
            )
        handlers["CreateAndListen"] = grpc.unary_stream_rpc_method_handler(
            servicer.create_and_write, request_deserializer=handlers["CreateAndListen"].request_deserializer
        )
        handlers["Get"] = registration.unary_bytes(servicer.get_wire, handlers["Get"])

    registration.add_with_replacements(
        run_pb2_grpc.add_RunServiceServicer_to_server, servicer, server, replace
    )


def _check_run_id(run_id: str) -> None:
    validation.require_id("run_id", run_id, "run")
    context.note_run(run_id)


# validation.require_id's test for a well-formed run id, bound once for Get.
_well_formed_run_id = validation.id_test("run")


def _check_overrides(v: Validator, request: run_pb2.CreateRunRequest) -> None:
    if request.HasField("instructions"):
        v.text("instructions", request.instructions, validation.MAX_INSTRUCTIONS)
    v.text("additional_instructions", request.additional_instructions, validation.MAX_INSTRUCTIONS)
    if request.HasField("model"):
        v.text("model", request.model, validation.MAX_MODEL_NAME)
    v.tools("tools", request.tools)
    v.completion(
        "",
        request.temperature if request.HasField("temperature") else None,
        request.top_p if request.HasField("top_p") else None,
        request.max_completion_tokens if request.HasField("max_completion_tokens") else None,
        "max_completion_tokens",
    )
    if request.HasField("max_prompt_tokens"):
        v.positive("max_prompt_tokens", request.max_prompt_tokens)
    if request.HasField("truncation_strategy"):
        v.truncation("truncation_strategy", request.truncation_strategy)
    if request.HasField("response_format"):
        v.response_format("response_format", request.response_format)
    v.labels("labels", request.labels)
    v.request_id(request.request_id)


def _check_tool_results(request: run_pb2.SubmitToolResultsRequest, limits: Limits) -> dict[str, str]:
    v = Validator(limits)
    v.resource_id("run_id", request.run_id, "run")
    v.request_id(request.request_id)
    if not request.tool_results:
        v.add("tool_results", "is required: one result for every pending tool call")
    if len(request.tool_results) > validation.MAX_TOOL_RESULTS:
        v.add("tool_results", f"at most {validation.MAX_TOOL_RESULTS} results are allowed")
    results: dict[str, str] = {}
    for index, result in enumerate(request.tool_results):
        if not result.tool_call_id:
            v.add(f"tool_results[{index}].tool_call_id", "is required")
        elif result.tool_call_id in results:
            v.add(f"tool_results[{index}].tool_call_id", f"duplicate result for {result.tool_call_id!r}")
        results[result.tool_call_id] = result.output
    v.tool_outputs("tool_results", [result.output for result in request.tool_results])
    v.check()
    return results


def _already_submitted(steps: list[run_pb2.RunStep], results: dict[str, str]) -> bool:
    for step in steps:
        if step.type != run_pb2.RunStep.TOOL_CALLS or step.status != run_pb2.RunStep.COMPLETED:
            continue
        answered = {call.id: call.output for call in step.tool_calls.tool_calls}
        if answered == results:
            return True
    return False
