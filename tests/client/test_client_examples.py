"""Every example in examples/ runs against a real server and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.server import ServerProcess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXPECTED = {
    "quickstart.py": ["You said: Hello, Spindle!"],
    "streaming.py": ["Tell me a story about a spindle.", "[COMPLETED]"],
    "tool_calling.py": [
        'get_weather returned {"city": "Paris"',
        '{"city": "Tokyo"',
        '{"city": "Oslo"',
        "COMPLETED",
    ],
    "async_quickstart.py": [
        "You said: Hello from asyncio!",
        "Stream this, please.",
        "returned 12:00 in Lima",
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, server: ServerProcess) -> None:
    env = {**os.environ, "SPINDLE_TARGET": server.address}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for expected in EXPECTED[name]:
        assert expected in done.stdout


def test_every_example_is_tested() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)


def test_the_readme_tool_calling_script_runs(server: ServerProcess, tmp_path: Path) -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert "## Python client" in readme
    section = readme.split("## Python client", 1)[1]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"localhost:50051"' in script
    path = tmp_path / "readme_script.py"
    path.write_text(script.replace('"localhost:50051"', repr(server.address)))
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == 'Tool results: get_weather returned {"city": "Paris", "temperature": 21}'
