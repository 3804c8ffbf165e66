"""``python -m tests.cli_at INSTANT ARGS…``: the ``broker`` command in a process of its own,
on a clock that starts at INSTANT (ISO 8601 with offset) and runs on from there.

The crash tests kill a settlement command at a named point; the command runs in
its own process so that only it dies, and on the test's day clock so that a day
can be closed after its end and confirmed after its late window.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from broker.cli.main import main

if __name__ == "__main__":
    start, wall = datetime.fromisoformat(sys.argv[1]), datetime.now(UTC)
    main(sys.argv[2:], obj={"clock": lambda: start + (datetime.now(UTC) - wall)})
