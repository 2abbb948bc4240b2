"""Drives the real Yandex AI Studio SDK against a Spindle server; run in .venv-yandex, not .venv.

The SDK pins protobuf<7 and Spindle runs 7, so tests/test_yandex_compat.py starts this script as
a subprocess and reads one JSON document of what the SDK saw from its stdout:

    python tests/yandex_sdk_driver.py ADDRESS SCENARIO [--api-key KEY | --iam-token KEY]

Scenarios: `sync` and `async` (the whole flow: assistant, thread, write, run, listen, wait, a
tool round trip, get, get_last_by_thread, list), `start` (leave a run for another API to
follow), `fail` (a failing model), `update` (partial updates), `search-index` (an unsupported
call), `read` (a thread list, to test auth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import warnings
from typing import Any

warnings.simplefilter("ignore")  # yandex-cloud-ml-sdk says it is deprecated, on stderr

from yandex_ai_studio_sdk.auth import APIKeyAuth, IAMTokenAuth, NoAuth  # noqa: E402
from yandex_cloud_ml_sdk import AsyncYCloudML, YCloudML  # noqa: E402

FOLDER = "folder-test"
WEATHER = {
    "name": "weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def _auth(args: argparse.Namespace) -> Any:
    if args.api_key:
        return APIKeyAuth(args.api_key)
    if args.iam_token:
        return IAMTokenAuth(args.iam_token)
    return NoAuth()


def _event(event: Any) -> dict[str, Any]:
    return {"status": event.status.name, "text": event.text if event.message else None}


def _result(result: Any) -> dict[str, Any]:
    calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in result.tool_calls or ()]
    text = None if result.status.name == "FAILED" else result.text  # the SDK raises on a failed one
    return {"status": result.status.name, "text": text, "tool_calls": calls, "error": result.error}


def sync_flow(args: argparse.Namespace) -> dict[str, Any]:
    sdk = YCloudML(folder_id=FOLDER, endpoint=args.address, auth=_auth(args), verify=False)
    out: dict[str, Any] = {}
    assistant = sdk.assistants.create(
        "builtin", instruction="be brief", tools=[sdk.tools.function(**WEATHER)]
    )
    out["assistant"] = {"id": assistant.id, "model_uri": assistant.model.uri}
    out["assistant_expiration"] = assistant.expiration_config.expiration_policy.name
    thread = sdk.threads.create(name="yandex-sync")
    out["thread"] = {"id": thread.id, "name": thread.name, "ttl_days": thread.expiration_config.ttl_days}
    thread.write("hello from yandex")
    run = assistant.run_stream(thread)
    out["run_id"] = run.id
    out["events"] = [_event(event) for event in run.listen()]
    out["result"] = _result(run.wait(poll_interval=0.05))
    thread.write('/tool weather {"city": "Oslo"}')
    tool_run = assistant.run(thread)
    out["tool_run_id"] = tool_run.id
    out["tool_calls"] = _result(tool_run.wait(poll_interval=0.05))
    tool_run.submit_tool_results([{"name": "weather", "content": "sunny"}])
    out["tool_result"] = _result(tool_run.wait(poll_interval=0.05))
    out["get"] = _result(sdk.runs.get(run.id).get_result())
    out["last_by_thread"] = sdk.runs.get_last_by_thread(thread).id
    out["messages"] = [{"role": m.role, "text": m.text} for m in thread.read()]
    out["runs"] = [r.id for r in sdk.runs.list(page_size=1)]
    out["threads"] = [t.id for t in sdk.threads.list(page_size=1)]
    out["assistants"] = [a.id for a in sdk.assistants.list(page_size=1)]
    return out


async def async_flow(args: argparse.Namespace) -> dict[str, Any]:
    sdk = AsyncYCloudML(folder_id=FOLDER, endpoint=args.address, auth=_auth(args), verify=False)
    out: dict[str, Any] = {}
    assistant = await sdk.assistants.create(
        "builtin", instruction="be brief", tools=[sdk.tools.function(**WEATHER)]
    )
    out["assistant"] = {"id": assistant.id, "model_uri": assistant.model.uri}
    out["assistant_expiration"] = assistant.expiration_config.expiration_policy.name
    thread = await sdk.threads.create(name="yandex-async")
    out["thread"] = {"id": thread.id, "name": thread.name, "ttl_days": thread.expiration_config.ttl_days}
    await thread.write("hello from yandex")
    run = await assistant.run_stream(thread)
    out["run_id"] = run.id
    out["events"] = [_event(event) async for event in run.listen()]
    out["result"] = _result(await run.wait(poll_interval=0.05))
    await thread.write('/tool weather {"city": "Oslo"}')
    tool_run = await assistant.run(thread)
    out["tool_run_id"] = tool_run.id
    out["tool_calls"] = _result(await tool_run.wait(poll_interval=0.05))
    await tool_run.submit_tool_results([{"name": "weather", "content": "sunny"}])
    out["tool_result"] = _result(await tool_run.wait(poll_interval=0.05))
    out["get"] = _result(await (await sdk.runs.get(run.id)).get_result())
    out["last_by_thread"] = (await sdk.runs.get_last_by_thread(thread)).id
    out["messages"] = [{"role": m.role, "text": m.text} async for m in thread.read()]
    out["runs"] = [r.id async for r in sdk.runs.list(page_size=1)]
    out["threads"] = [t.id async for t in sdk.threads.list(page_size=1)]
    out["assistants"] = [a.id async for a in sdk.assistants.list(page_size=1)]
    return out


def start(args: argparse.Namespace) -> dict[str, Any]:
    sdk = YCloudML(folder_id=FOLDER, endpoint=args.address, auth=_auth(args), verify=False)
    assistant = sdk.assistants.create("builtin")
    thread = sdk.threads.create()
    thread.write("followed elsewhere")
    run = assistant.run(thread)
    return {"run_id": run.id, "thread_id": thread.id}


def fail(args: argparse.Namespace) -> dict[str, Any]:
    sdk = YCloudML(folder_id=FOLDER, endpoint=args.address, auth=_auth(args), verify=False)
    assistant = sdk.assistants.create("builtin")
    thread = sdk.threads.create()
    thread.write("/fail the model fell over")
    run = assistant.run_stream(thread)
    events = [{"status": e.status.name, "error": e.error} for e in run.listen()]
    return {"events": events, "result": _result(run.wait(poll_interval=0.05))}


def update(args: argparse.Namespace) -> dict[str, Any]:
    sdk = YCloudML(folder_id=FOLDER, endpoint=args.address, auth=_auth(args), verify=False)
    assistant = sdk.assistants.create(
        "builtin", name="before", temperature=0.3, max_tokens=100, max_prompt_tokens=500
    )
    seen = []
    for change in ({"temperature": 0.9}, {"ttl_days": 3}, {"name": "after", "instruction": "terse"}):
        assistant.update(**change)
        got = sdk.assistants.get(assistant.id)
        seen.append(
            {
                "name": got.name,
                "instruction": got.instruction,
                "temperature": got.model.config.temperature,
                "max_tokens": got.model.config.max_tokens,
                "max_prompt_tokens": got.max_prompt_tokens,
            }
        )
    return {"updates": seen}


def _rpc_error(call: Any) -> dict[str, Any]:
    try:
        call()
    except Exception as exc:  # the SDK's AioRpcError, whose code and details we report
        code = getattr(exc, "code", None)
        details = getattr(exc, "details", None)
        return {
            "code": code().name if callable(code) else None,
            "details": details() if callable(details) else "",
        }
    return {"code": "OK", "details": ""}


def search_index(args: argparse.Namespace) -> dict[str, Any]:
    sdk = YCloudML(folder_id=FOLDER, endpoint=args.address, auth=_auth(args), verify=False)
    return _rpc_error(lambda: list(sdk.search_indexes.list()))


def read(args: argparse.Namespace) -> dict[str, Any]:
    sdk = YCloudML(folder_id=FOLDER, endpoint=args.address, auth=_auth(args), verify=False)
    return _rpc_error(lambda: list(sdk.threads.list()))


SCENARIOS = {
    "sync": sync_flow,
    "start": start,
    "update": update,
    "fail": fail,
    "search-index": search_index,
    "read": read,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("scenario", choices=[*SCENARIOS, "async"])
    parser.add_argument("--api-key")
    parser.add_argument("--iam-token")
    args = parser.parse_args()
    result = asyncio.run(async_flow(args)) if args.scenario == "async" else SCENARIOS[args.scenario](args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
