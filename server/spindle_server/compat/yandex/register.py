"""Adds the Yandex services to Spindle's gRPC server, over the servicers Spindle serves itself."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from spindle_server.api.assistants import AssistantServicer
from spindle_server.api.interceptor import ApiKeys
from spindle_server.api.runs import RunServicer
from spindle_server.api.threads import MessageServicer, ThreadServicer
from spindle_server.compat.yandex import pb
from spindle_server.compat.yandex import services as ys

# Services the SDK may call that Spindle has no equivalent for: UNIMPLEMENTED, saying so.
UNSUPPORTED = (
    (pb.search_index_grpc, "SearchIndexService", "search indexes"),
    (pb.search_index_file_grpc, "SearchIndexFileService", "search index files"),
    (pb.user_grpc, "UserService", "assistant users"),
)


def service_names() -> tuple[str, ...]:
    """Full names, for reflection."""
    modules = (
        pb.assistant_service,
        pb.thread_service,
        pb.message_service,
        pb.run_service,
        pb.endpoint_service,
        *(module_grpc_descriptor(m) for m, _, _ in UNSUPPORTED),
    )
    return tuple(service.full_name for m in modules for service in m.DESCRIPTOR.services_by_name.values())


def module_grpc_descriptor(grpc_module: object) -> object:
    """The _pb2 module beside a generated _pb2_grpc module."""
    import importlib

    return importlib.import_module(grpc_module.__name__.removesuffix("_grpc"))  # type: ignore[attr-defined]


def register(
    server: grpc.aio.Server,
    *,
    assistants: AssistantServicer,
    threads: ThreadServicer,
    messages: MessageServicer,
    runs: RunServicer,
    keys: ApiKeys,
    address: Callable[[], str],
) -> None:
    pb.assistant_grpc.add_AssistantServiceServicer_to_server(ys.YandexAssistants(assistants), server)
    pb.thread_grpc.add_ThreadServiceServicer_to_server(ys.YandexThreads(threads), server)
    pb.message_grpc.add_MessageServiceServicer_to_server(ys.YandexMessages(messages), server)
    pb.run_grpc.add_RunServiceServicer_to_server(ys.YandexRuns(runs, keys), server)
    pb.endpoint_grpc.add_ApiEndpointServiceServicer_to_server(ys.Endpoints(address), server)
    for module, service, what in UNSUPPORTED:
        base = getattr(module, f"{service}Servicer")
        adder = getattr(module, f"add_{service}Servicer_to_server")
        adder(ys.unimplemented_servicer(base, service, what), server)


def advertised_address(host: str, port: int) -> str:
    """Where discovery sends the SDK: this server; a wildcard bind is reached on localhost
    (a remote SDK names the address itself with service_map={'ai-assistants': ...})."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "localhost"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
