"""The committed generated code must be what `make proto` produces from the protos."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _genproto() -> object:
    spec = importlib.util.spec_from_file_location("genproto", ROOT / "scripts" / "genproto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["genproto"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_code_matches_protos(tmp_path: Path) -> None:
    genproto = _genproto()
    written = genproto.generate(tmp_path)  # type: ignore[attr-defined]
    committed_dir = ROOT / "client" / "spindle" / "v1"
    assert written, "protoc wrote nothing"
    stale = [p.name for p in written if (committed_dir / p.name).read_bytes() != p.read_bytes()]
    generated_names = {p.name for p in written}
    orphans = sorted(
        p.name
        for p in committed_dir.iterdir()
        if p.name.endswith(genproto.GENERATED_SUFFIXES) and p.name not in generated_names  # type: ignore[attr-defined]
    )
    assert not stale, f"stale generated files (run `make proto`): {stale}"
    assert not orphans, f"generated files without a proto: {orphans}"
