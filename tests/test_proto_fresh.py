"""The committed generated code equals what scripts/gen-proto makes from proto/ now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_not_stale(tmp_path: Path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-proto"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "broker" / "_proto"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert fresh == sorted(
        p.relative_to(committed) for p in committed.rglob("*.py*") if "__pycache__" not in p.parts
    )
    stale = [str(p) for p in fresh if (tmp_path / p).read_text() != (committed / p).read_text()]
    assert not stale, f"regenerate with scripts/gen-proto: {stale}"
