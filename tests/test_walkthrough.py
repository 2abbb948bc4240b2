"""The README's grpcurl walkthrough, run as written with the real grpcurl against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support.server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def walkthrough_script() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) >= 5
    return "\n".join(blocks)


def test_readme_walkthrough_runs_as_written(server: ServerProcess, tmp_path: Path) -> None:
    script = walkthrough_script().replace("localhost:50051", server.address)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for service in ("spindle.v1.AssistantService", "spindle.v1.RunService", "grpc.health.v1.Health"):
        assert service in out
    assert '"status": "SERVING"' in out
    assert '"type": "PARTIAL_MESSAGE"' in out and '"type": "DONE"' in out
    assert "You said: /sleep 2 Hello Spindle, tell me about spindles." in out
    assert out.count('"type": "DONE"') >= 2  # the live Listen and the replay from index 3
    assert '"status": "TOOL_CALLS"' in out and '"name": "get_weather"' in out
    assert 'Tool results: get_weather returned {\\"temp_c\\": 21}' in out
    assert '"type": "TOOL_CALLS"' in out  # the run step
