"""Regenerate the committed Yandex AI Studio stubs in server/spindle_server/compat/yandex/gen/.

The `yandexcloud` package ships these protos' generated code, but pins protobuf<7 while Spindle
runs protobuf 7, so the two cannot share an environment. This script reads the file descriptors
that `yandexcloud` ships (run in the SDK's own environment, .venv-yandex), and compiles them with
Spindle's grpcio-tools into a package below spindle_server, so the wire format is exactly the
shipped one and nothing named `yandex` is put on sys.path.

    make yandex-proto
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "server" / "spindle_server" / "compat" / "yandex" / "gen"
PACKAGE = "spindle_server.compat.yandex.gen"
# The services the SDK calls, and the endpoint discovery it starts with; their imports come along.
ROOT_MODULES = (
    "yandex.cloud.ai.assistants.v1.assistant_service_pb2",
    "yandex.cloud.ai.assistants.v1.threads.thread_service_pb2",
    "yandex.cloud.ai.assistants.v1.threads.message_service_pb2",
    "yandex.cloud.ai.assistants.v1.runs.run_service_pb2",
    "yandex.cloud.ai.assistants.v1.searchindex.search_index_service_pb2",
    "yandex.cloud.ai.assistants.v1.searchindex.search_index_file_service_pb2",
    "yandex.cloud.ai.assistants.v1.users.user_service_pb2",
    "yandex.cloud.endpoint.api_endpoint_service_pb2",
)

DUMP = """
import importlib, sys
from google.protobuf import descriptor_pb2
seen, out = set(), descriptor_pb2.FileDescriptorSet()
def add(fd):
    if fd.name in seen:
        return
    seen.add(fd.name)
    for dep in fd.dependencies:
        add(dep)
    proto = out.file.add()
    fd.CopyToProto(proto)
for name in sys.argv[2:]:
    add(importlib.import_module(name).DESCRIPTOR)
open(sys.argv[1], "wb").write(out.SerializeToString())
print(" ".join(sorted(n for n in seen if n.startswith("yandex/"))))
"""


def generate(yandex_python: str, output: Path) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = Path(tmp) / "yandex.binpb"
        dumped = subprocess.run(
            [yandex_python, "-c", DUMP, str(descriptors), *ROOT_MODULES],
            check=True,
            capture_output=True,
            text=True,
        )
        files = dumped.stdout.split()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--descriptor_set_in={descriptors}",
                f"--python_out={output}",
                f"--grpc_python_out={output}",
                *files,
            ],
            check=True,
        )
    written = sorted(output.rglob("*.py"))
    for path in written:
        path.write_text(_relocate(path.read_text()))
    for folder in [output, *(p for p in output.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return sorted(output.rglob("*.py"))


def _relocate(source: str) -> str:
    """Imports of yandex.* become imports below PACKAGE; the serialized descriptors stay as they are."""
    source = re.sub(r"^from yandex\.", f"from {PACKAGE}.yandex.", source, flags=re.M)
    return re.sub(r"^import yandex\.", f"import {PACKAGE}.yandex.", source, flags=re.M)


def main() -> None:
    yandex_python = str(ROOT / ".venv-yandex" / "bin" / "python")
    with tempfile.TemporaryDirectory() as tmp:
        written = generate(yandex_python, Path(tmp))
        if TARGET.exists():
            shutil.rmtree(TARGET)
        shutil.copytree(tmp, TARGET)
        (TARGET / "__init__.py").write_text(
            '"""Generated from the protos yandexcloud ships: make yandex-proto."""\n'
        )
    print(f"generated {len(written)} files in {TARGET.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
