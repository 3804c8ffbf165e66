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
``PATH``. A block that runs until stopped (``broker serve``) is started with
:func:`start_block` and ended with :func:`stop_block`.

A file the commands read (``node.toml``) is a fenced block of any language
after ``<!-- runbook-file: NAME -->``; :func:`file_block` returns its text.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

_MARKER = re.compile(r"^<!-- runbook: (?P<name>[a-z0-9-]+) -->$")
_FILE_MARKER = re.compile(r"^<!-- runbook-file: (?P<name>[A-Za-z0-9._-]+) -->$")
_FENCE_OPEN = re.compile(r"^```(?:sh|bash)$")
_ANY_FENCE_OPEN = re.compile(r"^```[a-z]*$")
_FENCE_CLOSE = "```"


class RunbookError(Exception):
    """A marker without a block after it, or a block left open."""


def _block_after(lines: list[str], marker_at: int, path: Path, fence: re.Pattern[str]) -> str:
    where = f"{path}:{marker_at + 1}"
    if marker_at + 1 >= len(lines) or not fence.match(lines[marker_at + 1]):
        kind = "```sh" if fence is _FENCE_OPEN else "```"
        raise RunbookError(f"{where}: a runbook marker must be followed at once by a {kind} fence")
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
            found.append(_block_after(lines, i, path, _FENCE_OPEN))
    return found


def file_block(path: Path, name: str) -> str:
    """The text of the one block marked ``<!-- runbook-file: NAME -->`` in ``path``."""
    lines = path.read_text().splitlines()
    found = [
        _block_after(lines, i, path, _ANY_FENCE_OPEN)
        for i, line in enumerate(lines)
        if (m := _FILE_MARKER.match(line.strip())) is not None and m.group("name") == name
    ]
    if len(found) != 1:
        raise RunbookError(f"{path}: {len(found)} blocks marked as file {name}, not one")
    return found[0]


def _environment(env: Mapping[str, str]) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent  # the venv's bin, not the interpreter it links to
    full = {**os.environ, **env}
    full["PATH"] = os.pathsep.join([str(bin_dir), full.get("PATH", "")])
    return full


def run_block(
    text: str, env: Mapping[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``text`` with ``bash -euo pipefail``: ``env`` over this process's, ``broker`` on PATH."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text],
        env=_environment(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_block(
    text: str, env: Mapping[str, str], cwd: Path | None, output: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start ``text`` as :func:`run_block` would, in the background, in a process group of its own.

    Its stdout and stderr go to ``output``.
    """
    return subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", text],
        env=_environment(env),
        cwd=cwd,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_block(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM to the block's process group (bash and what it runs); its exit status."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def faketime_library() -> Path | None:
    """libfaketime (Debian's ``faketime``): runs a process on a clock moved by a file."""
    for found in sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1")):
        return found
    return None


class ProcessClock:
    """The clock of the processes a runbook test starts: the wall clock plus an offset read
    from a file (libfaketime), so their settlement day can be closed after midnight and
    confirmed after its late window. Monotonic clocks are left alone (timers keep working).
    """

    def __init__(self, library: Path, path: Path) -> None:
        self.library = library
        self.path = path
        self.path.write_text("+0\n")

    @property
    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": str(self.library),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_CACHE_DURATION": "1",
        }

    def move_to(self, at: datetime) -> None:
        """Every process's clock reads ``at`` (and runs on) within a second and a half."""
        offset = int((at - datetime.now(UTC)).total_seconds()) + 1
        self.path.write_text(f"+{offset}\n")
        time.sleep(1.5)  # each process re-reads the file once its second of cache is over
