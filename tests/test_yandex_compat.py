"""Yandex AI Studio's assistants API on Spindle's gRPC port, driven by the real SDK.

yandex-cloud-ml-sdk==0.19.1 with yandex-ai-studio-sdk==0.22.0 pin protobuf<7 (through
yandexcloud) and Spindle runs protobuf 7, so the SDK lives in .venv-yandex (`make test` builds
it) and tests/yandex_sdk_driver.py runs it in a subprocess that prints what the SDK saw. The
in-process tests use the stubs compiled from the same protos (compat/yandex/gen).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from spindle.v1 import run_pb2
from spindle_server.compat.yandex import pb
from support.server import ServerProcess
from support.stubs import Stubs, error_details

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "yandex_sdk_driver.py"
SDK_TIMEOUT = 120.0  # a failure bound: the flows take seconds


def _sdk_python() -> str:
    python = os.environ.get("SPINDLE_YANDEX_PYTHON") or str(ROOT / ".venv-yandex" / "bin" / "python")
    if not Path(python).exists():
        if os.environ.get("CI"):
            pytest.fail(
                f"the Yandex SDK environment is missing ({python}): make .venv-yandex/.installed-stamp"
            )
        pytest.skip("the Yandex SDK environment is missing: make .venv-yandex/.installed-stamp")
    return python


def sdk(address: str, scenario: str, *auth: str) -> dict[str, Any]:
    """Runs one scenario of the real SDK against `address` and returns what it saw."""
    done = subprocess.run(
        [_sdk_python(), str(DRIVER), address, scenario, *auth],
        capture_output=True,
        text=True,
        timeout=SDK_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("scenario", ["sync", "async"])
def test_sdk_flow(server: ServerProcess, stubs: Stubs, scenario: str) -> None:
    """Assistant, thread, write, run, listen, wait, a tool round trip, get, get_last_by_thread
    and list, through the SDK's sync and async clients; Spindle's own API sees the same run."""
    seen = sdk(server.address, scenario)

    assert seen["assistant"]["model_uri"].endswith("/builtin/latest")
    assert seen["assistant_expiration"] == "SINCE_LAST_ACTIVE"
    assert seen["thread"]["name"] == f"yandex-{scenario}"
    assert seen["thread"]["ttl_days"] > 0

    reply = "You said: hello from yandex"
    events = seen["events"]
    assert [e["status"] for e in events][-1] == "DONE"
    assert {e["status"] for e in events[:-1]} == {"PARTIAL_MESSAGE"}
    # Partial messages carry the text so far, as Yandex's do: each a prefix of the reply.
    assert all(reply.startswith(e["text"]) for e in events[:-1])
    assert events[-1]["text"] == reply
    assert seen["result"] == {"status": "COMPLETED", "text": reply, "tool_calls": [], "error": None}
    assert seen["get"] == seen["result"]

    assert seen["tool_calls"]["status"] == "TOOL_CALLS"
    assert seen["tool_calls"]["tool_calls"] == [{"name": "weather", "arguments": {"city": "Oslo"}}]
    assert seen["tool_result"]["status"] == "COMPLETED"
    assert seen["tool_result"]["text"] == "Tool results: weather returned sunny"
    assert seen["last_by_thread"] == seen["tool_run_id"]

    # Newest first, with Yandex's upper-case roles.
    assert seen["messages"] == [
        {"role": "ASSISTANT", "text": "Tool results: weather returned sunny"},
        {"role": "USER", "text": '/tool weather {"city": "Oslo"}'},
        {"role": "ASSISTANT", "text": reply},
        {"role": "USER", "text": "hello from yandex"},
    ]
    # page_size=1: the SDK pages until an empty page, so both runs arriving means paging ended.
    assert {seen["run_id"], seen["tool_run_id"]} <= set(seen["runs"])
    assert len(seen["runs"]) == len(set(seen["runs"]))
    assert seen["thread"]["id"] in seen["threads"]
    assert seen["assistant"]["id"] in seen["assistants"]

    # One engine and store: Spindle's API reads the same runs.
    run = stubs.runs.Get(run_pb2.GetRunRequest(run_id=seen["run_id"]), timeout=10)
    assert run.status == run_pb2.COMPLETED
    assert run.reply.content[0].text.text == reply
    tool_run = stubs.runs.Get(run_pb2.GetRunRequest(run_id=seen["tool_run_id"]), timeout=10)
    assert tool_run.status == run_pb2.COMPLETED


def test_run_created_through_yandex_is_followed_with_spindle_listen(
    server: ServerProcess, stubs: Stubs
) -> None:
    started = sdk(server.address, "start")
    events = stubs.events(started["run_id"])
    assert [e.index for e in events] == list(range(len(events)))
    assert events[-1].type == run_pb2.StreamEvent.DONE
    assert events[-1].done.message.content[0].text.text == "You said: followed elsewhere"
    assert events[-1].done.message.thread_id == started["thread_id"]


def test_a_failed_run_reports_its_error(server: ServerProcess) -> None:
    seen = sdk(server.address, "fail")
    assert seen["events"][-1]["status"] == "ERROR"
    assert "the model fell over" in seen["events"][-1]["error"]
    assert seen["result"]["status"] == "FAILED"
    assert "the model fell over" in seen["result"]["error"]


def test_partial_updates_change_only_what_they_name(server: ServerProcess) -> None:
    """The SDK sends nested paths (completion_options.temperature) and expiration ones."""
    updates = sdk(server.address, "update")["updates"]
    kept = {"name": "before", "instruction": None, "max_tokens": 100, "max_prompt_tokens": 500}
    assert updates[0] == {**kept, "temperature": 0.9}
    assert updates[1] == {**kept, "temperature": 0.9}  # expiration only: nothing else moves
    assert updates[2] == {**kept, "temperature": 0.9, "name": "after", "instruction": "terse"}


def test_search_indexes_answer_unimplemented(server: ServerProcess) -> None:
    seen = sdk(server.address, "search-index")
    assert seen["code"] == "UNIMPLEMENTED"
    assert "search indexes" in seen["details"]
    assert "not supported" in seen["details"]


def test_api_key_and_bearer_map_to_spindle_keys(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--api-key", "key-yandex=yandex")
    assert sdk(server.address, "read", "--api-key", "key-yandex")["code"] == "OK"
    assert sdk(server.address, "read", "--iam-token", "key-yandex")["code"] == "OK"
    assert sdk(server.address, "read", "--api-key", "key-other")["code"] == "UNAUTHENTICATED"
    assert sdk(server.address, "read")["code"] == "UNAUTHENTICATED"

    # What the SDK made with one scheme is the project's, seen with the other and with Spindle's API.
    started = sdk(server.address, "start", "--api-key", "key-yandex")
    spindle = Stubs.connect(server.address, "key-yandex")
    try:
        assert spindle.wait(started["run_id"]).status == run_pb2.COMPLETED
    finally:
        spindle.close()


# ---- in process, over the compiled Yandex stubs ------------------------------------------------


def _channel(server: ServerProcess) -> grpc.Channel:
    return grpc.insecure_channel(server.address)


def test_discovery_points_back_at_this_server(server: ServerProcess) -> None:
    with _channel(server) as channel:
        found = pb.endpoint_grpc.ApiEndpointServiceStub(channel).List(
            pb.endpoint_service.ListApiEndpointsRequest(), timeout=10
        )
    assert {e.id: e.address for e in found.endpoints} == {
        "ai-assistants": server.address,
        "endpoint": server.address,
    }


def test_list_ends_with_a_token_then_an_empty_page(server: ServerProcess) -> None:
    with _channel(server) as channel:
        threads = pb.thread_grpc.ThreadServiceStub(channel)
        made = {
            threads.Create(pb.thread_service.CreateThreadRequest(name="page"), timeout=10).id
            for _ in range(2)
        }
        seen: list[str] = []
        token = ""
        for _ in range(1000):  # a bound, not a count: the listing must end
            page = threads.List(
                pb.thread_service.ListThreadsRequest(page_size=1, page_token=token), timeout=10
            )
            seen.extend(t.id for t in page.threads)
            if not page.threads:
                assert page.next_page_token == ""
                break
            assert page.next_page_token != ""  # the SDK stops only at an empty page
            token = page.next_page_token
        else:
            pytest.fail("the listing never ended")
    assert made <= set(seen)
    assert len(seen) == len(set(seen))


def test_errors_pass_through_as_statuses(server: ServerProcess) -> None:
    with _channel(server) as channel:
        runs = pb.run_grpc.RunServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            runs.Get(pb.run_service.GetRunRequest(run_id="run_000000000000000000000000"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as malformed:
            runs.Get(pb.run_service.GetRunRequest(run_id="nope"), timeout=10)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info, _ = error_details(malformed.value)
        assert info is not None and info.reason

        threads = pb.thread_grpc.ThreadServiceStub(channel)
        tool = pb.common.Tool(search_index=pb.common.SearchIndexTool(search_index_ids=["idx"]))
        with pytest.raises(grpc.RpcError) as unsupported:
            threads.Create(pb.thread_service.CreateThreadRequest(tools=[tool]), timeout=10)
        assert unsupported.value.code() == grpc.StatusCode.UNIMPLEMENTED

        assistants = pb.assistant_grpc.AssistantServiceStub(channel)
        with pytest.raises(grpc.RpcError) as search_tool:
            assistants.Create(
                pb.assistant_service.CreateAssistantRequest(model_uri="builtin", tools=[tool]), timeout=10
            )
        assert search_tool.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "search_index" in (search_tool.value.details() or "")


def test_attach_authenticates(make_server) -> None:  # type: ignore[no-untyped-def]
    """Attach is bidirectional, which the interceptor passes through: it checks the key itself."""
    server = make_server("--api-key", "key-yandex=yandex")
    request = pb.run_service.AttachRunRequest(run_id="run_000000000000000000000000")
    with _channel(server) as channel:
        runs = pb.run_grpc.RunServiceStub(channel)
        with pytest.raises(grpc.RpcError) as anonymous:
            list(runs.Attach(iter([request]), timeout=10))
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as keyed:
            list(runs.Attach(iter([request]), timeout=10, metadata=[("authorization", "Api-Key key-yandex")]))
        assert keyed.value.code() == grpc.StatusCode.NOT_FOUND  # past authentication, to the run


def test_committed_stubs_match_the_shipped_protos(tmp_path: Path) -> None:
    """compat/yandex/gen is what `make yandex-proto` compiles from the descriptors yandexcloud ships."""
    spec = importlib.util.spec_from_file_location("genyandex", ROOT / "scripts" / "genyandex.py")
    assert spec is not None and spec.loader is not None
    genyandex = importlib.util.module_from_spec(spec)
    sys.modules["genyandex"] = genyandex
    spec.loader.exec_module(genyandex)
    genyandex.generate(_sdk_python(), tmp_path)
    committed = genyandex.TARGET
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*.py")} - {Path("__init__.py")}
    kept = {p.relative_to(committed) for p in committed.rglob("*.py")} - {Path("__init__.py")}
    assert fresh, "protoc wrote nothing"
    assert sorted(map(str, kept - fresh)) == [], "committed stubs without a proto (make yandex-proto)"
    assert sorted(map(str, fresh - kept)) == [], "protos without committed stubs (make yandex-proto)"
    stale = sorted(str(p) for p in fresh if (tmp_path / p).read_bytes() != (committed / p).read_bytes())
    assert stale == [], f"stale stubs (make yandex-proto): {stale}"


def _run_waiting_for_tools(channel: grpc.Channel, stubs: Stubs) -> str:
    """A run, made through the Yandex API, that called `weather` and waits for its result."""
    weather = pb.common.Tool(function=pb.common.FunctionTool(name="weather", description="w"))
    assistant = pb.assistant_grpc.AssistantServiceStub(channel).Create(
        pb.assistant_service.CreateAssistantRequest(model_uri="builtin", tools=[weather]), timeout=10
    )
    text = pb.message.MessageContent(
        content=[pb.message.ContentPart(text=pb.message.Text(content="/tool weather {}"))]
    )
    thread = pb.thread_grpc.ThreadServiceStub(channel).Create(
        pb.thread_service.CreateThreadRequest(messages=[pb.message.MessageData(content=text)]), timeout=10
    )
    run = pb.run_grpc.RunServiceStub(channel).Create(
        pb.run_service.CreateRunRequest(assistant_id=assistant.id, thread_id=thread.id), timeout=10
    )
    assert stubs.wait_for(run.id, {run_pb2.TOOL_CALLS}).status == run_pb2.TOOL_CALLS
    return str(run.id)


def _results(*pairs: tuple[str, str]) -> Any:
    return pb.common.ToolResultList(
        tool_results=[
            pb.common.ToolResult(function_result=pb.common.FunctionResult(name=name, content=content))
            for name, content in pairs
        ]
    )


def test_attach_submits_results_and_streams_to_the_end(server: ServerProcess, stubs: Stubs) -> None:
    with _channel(server) as channel:
        run_id = _run_waiting_for_tools(channel, stubs)
        request = pb.run_service.AttachRunRequest(
            run_id=run_id, tool_result_list=_results(("weather", "rain"))
        )
        events = list(pb.run_grpc.RunServiceStub(channel).Attach(iter([request]), timeout=30))
    kinds = pb.run_service.StreamEvent
    assert [e.event_type for e in events].count(kinds.TOOL_CALLS) == 1
    assert events[-1].event_type == kinds.DONE
    assert (
        events[-1].completed_message.content.content[0].text.content == "Tool results: weather returned rain"
    )
    assert events[-1].completed_message.author.role == "ASSISTANT"
    indexes = [e.stream_cursor.current_event_idx for e in events]
    assert indexes == sorted(set(indexes))


def test_attach_ends_on_a_bad_later_request_while_the_run_waits(server: ServerProcess, stubs: Stubs) -> None:
    with _channel(server) as channel:
        run_id = _run_waiting_for_tools(channel, stubs)
        requests = [
            pb.run_service.AttachRunRequest(run_id=run_id),
            pb.run_service.AttachRunRequest(run_id=run_id, tool_result_list=_results(("nope", "x"))),
        ]
        with pytest.raises(grpc.RpcError) as refused:
            list(pb.run_grpc.RunServiceStub(channel).Attach(iter(requests), timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, _ = error_details(refused.value)
    assert info is not None and info.reason == "UNKNOWN_TOOL_RESULT"
    assert stubs.runs.Get(run_pb2.GetRunRequest(run_id=run_id), timeout=10).status == run_pb2.TOOL_CALLS


def test_out_of_range_and_corrupt_requests_get_statuses_not_internal(server: ServerProcess) -> None:
    """Found by fuzzing these services with tests/test_fuzz.py's generators: Yandex's int64
    fields into Spindle's int32 ones, and discovery (answered without a key) with a bad body."""
    huge = 2**40
    with _channel(server) as channel:
        for call, request in (
            (
                pb.thread_grpc.ThreadServiceStub(channel).List,
                pb.thread_service.ListThreadsRequest(page_size=-huge),
            ),
            (pb.run_grpc.RunServiceStub(channel).List, pb.run_service.ListRunsRequest(page_size=-huge)),
            (
                pb.run_grpc.RunServiceStub(channel).Create,
                pb.run_service.CreateRunRequest(
                    assistant_id="asst_000000000000000000000000",
                    thread_id="thread_000000000000000000000000",
                    custom_prompt_truncation_options=pb.common.PromptTruncationOptions(
                        last_messages_strategy=pb.common.PromptTruncationOptions.LastMessagesStrategy(
                            num_messages=-huge
                        )
                    ),
                ),
            ),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        big = pb.thread_grpc.ThreadServiceStub(channel).List(
            pb.thread_service.ListThreadsRequest(page_size=huge), timeout=10
        )
        assert len(big.threads) <= 100  # clamped to Spindle's largest page

        endpoints = pb.endpoint_grpc.ApiEndpointServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unknown:
            endpoints.Get(pb.endpoint_service.GetApiEndpointRequest(api_endpoint_id="nope"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        info, _ = error_details(unknown.value)
        assert info is not None and info.reason == "ENDPOINT_NOT_FOUND"
        raw = channel.unary_unary("/yandex.cloud.endpoint.ApiEndpointService/List")
        with pytest.raises(grpc.RpcError) as corrupt:
            raw(b"\x00", timeout=10)
        assert corrupt.value.code() == grpc.StatusCode.INVALID_ARGUMENT
