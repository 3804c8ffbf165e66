"""The previous release's code, to run beside this one: districts upgrade on different days.

``PREVIOUS_RELEASE`` is the last commit before versioned migrations and the one
signing module (issue 9). :func:`extract` writes its ``broker`` package from git
into a directory; :func:`run` runs Python there, so ``import broker`` is that
release's code (with this checkout's installed dependencies). Without git or the
commit — a source tarball rather than a clone — the tests skip, and fail under ``CI``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tests.conftest import unavailable

PREVIOUS_RELEASE = "1069d5f78cdec680076c465f60ad1ed1c6d7ebb3"
ROOT = Path(__file__).resolve().parents[2]


def extract(dest: Path) -> Path:
    """The previous release's ``broker`` package under ``dest`` (returned)."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        unavailable("the previous release needs git and this checkout's history")
    with tempfile.TemporaryFile() as archive:
        done = subprocess.run(
            [git or "git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "broker"],
            stdout=archive,
            stderr=subprocess.PIPE,
            check=False,
        )
        if done.returncode != 0:
            unavailable(f"commit {PREVIOUS_RELEASE[:10]} is not in this clone: {done.stderr!r}")
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(dest, filter="data")
    probe = run(dest, "import broker.core.signing as s; print(hasattr(s, 'Purpose'))")
    assert probe.stdout.strip() == "False", "the extracted tree is not the previous release"
    return dest


def environment(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env.pop("PYTHONSAFEPATH", None)
    return env


def run(
    tree: Path, code: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with the previous release's ``broker``; a failure shows its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tree,
        env=environment(tree),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"previous release failed:\n{done.stderr[-4000:]}"
    return done


def cli(tree: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``broker <args>`` as the previous release."""
    return run(tree, "from broker.cli.main import main; main()", *args, timeout=timeout)
