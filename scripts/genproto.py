"""Regenerate the committed Python code for proto/spindle/v1 (`make proto`).

The staleness test calls `generate()` into a temporary folder and compares the result with the
committed files, so the two can never drift apart silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = Path("spindle") / "v1"
OUTPUT_ROOT = ROOT / "client"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(output_root: Path) -> list[Path]:
    """Run protoc (grpcio-tools) with the mypy-protobuf plugins; return the files written."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={output_root}",
        f"--grpc_python_out={output_root}",
        f"--mypy_out={output_root}",
        f"--mypy_grpc_out={output_root}",
        *[str(p) for p in proto_files()],
    ]
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return sorted(p for p in (output_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        written = generate(Path(tmp))
        target = OUTPUT_ROOT / PACKAGE_DIR
        for old in target.iterdir():
            if old.name.endswith(GENERATED_SUFFIXES):
                old.unlink()
        for path in written:
            shutil.copy2(path, target / path.name)
    print(f"generated {len(written)} files in {OUTPUT_ROOT / PACKAGE_DIR}")


if __name__ == "__main__":
    main()
