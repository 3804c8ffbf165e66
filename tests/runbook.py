"""Runbook blocks that tests run as written.

A block is a fenced ``sh`` block introduced by a marker line, immediately
before its fence::

    <!-- runbook: compromised-node-key -->
    ```sh
    broker certs publish-epoch --district "$DISTRICT" --dir "$DIR"
    ```

Several blocks may share a name (the steps of one procedure, in order). The
commands use variables the runbook documents (``$DIR``, ``$DISTRICT`` …),
which the test provides; each block runs under ``bash -euo pipefail`` with
this interpreter's ``bin`` directory (where ``broker`` is installed) first on
``PATH``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

_MARKER = re.compile(r"^<!-- runbook: (?P<name>[a-z0-9-]+) -->$")
_FENCE_OPEN = re.compile(r"^```(?:sh|bash)$")
_FENCE_CLOSE = "```"


class RunbookError(Exception):
    """A marker without a block after it, or a block left open."""


def _block_after(lines: list[str], marker_at: int, path: Path) -> str:
    where = f"{path}:{marker_at + 1}"
    if marker_at + 1 >= len(lines) or not _FENCE_OPEN.match(lines[marker_at + 1]):
        raise RunbookError(f"{where}: a runbook marker must be followed at once by a ```sh fence")
    body: list[str] = []
    for line in lines[marker_at + 2 :]:
        if line == _FENCE_CLOSE:
            return "\n".join(body) + "\n"
        body.append(line)
    raise RunbookError(f"{where}: the block is never closed")


def blocks(path: Path, name: str) -> list[str]:
    """The shell text of each block marked ``<!-- runbook: NAME -->`` in ``path``, in order."""
    lines = path.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        m = _MARKER.match(line.strip())
        if m is not None and m.group("name") == name:
            found.append(_block_after(lines, i, path))
    return found


def run_block(
    text: str, env: Mapping[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``text`` with ``bash -euo pipefail``: ``env`` over this process's, ``broker`` on PATH."""
    bin_dir = Path(sys.executable).parent  # the venv's bin, not the interpreter it links to
    full = {**os.environ, **env}
    full["PATH"] = os.pathsep.join([str(bin_dir), full.get("PATH", "")])
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
