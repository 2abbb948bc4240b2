"""Short names for the generated Yandex modules (see scripts/genyandex.py)."""

from __future__ import annotations

from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1 import (
    assistant_pb2 as assistant,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1 import (
    assistant_service_pb2 as assistant_service,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1 import (
    assistant_service_pb2_grpc as assistant_grpc,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1 import common_pb2 as common
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.runs import run_pb2 as run
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.runs import (
    run_service_pb2 as run_service,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.runs import (
    run_service_pb2_grpc as run_grpc,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.searchindex import (
    search_index_file_service_pb2_grpc as search_index_file_grpc,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.searchindex import (
    search_index_service_pb2_grpc as search_index_grpc,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.threads import (
    message_pb2 as message,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.threads import (
    message_service_pb2 as message_service,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.threads import (
    message_service_pb2_grpc as message_grpc,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.threads import thread_pb2 as thread
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.threads import (
    thread_service_pb2 as thread_service,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.threads import (
    thread_service_pb2_grpc as thread_grpc,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.assistants.v1.users import (
    user_service_pb2_grpc as user_grpc,
)
from spindle_server.compat.yandex.gen.yandex.cloud.ai.common import common_pb2 as ai_common
from spindle_server.compat.yandex.gen.yandex.cloud.endpoint import api_endpoint_pb2 as endpoint
from spindle_server.compat.yandex.gen.yandex.cloud.endpoint import (
    api_endpoint_service_pb2 as endpoint_service,
)
from spindle_server.compat.yandex.gen.yandex.cloud.endpoint import (
    api_endpoint_service_pb2_grpc as endpoint_grpc,
)

__all__ = [
    "ai_common",
    "assistant",
    "assistant_grpc",
    "assistant_service",
    "common",
    "endpoint",
    "endpoint_grpc",
    "endpoint_service",
    "message",
    "message_grpc",
    "message_service",
    "run",
    "run_grpc",
    "run_service",
    "search_index_file_grpc",
    "search_index_grpc",
    "thread",
    "thread_grpc",
    "thread_service",
    "user_grpc",
]
