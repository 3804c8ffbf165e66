"""Logging in every process (broker/core/logs.py): a spawned worker logs as its parent chose,
to stderr, never to stdout (which carries the commands' own output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from broker.core.logs import JSON_ENV, LEVEL_ENV, configure

CHILD = (
    "import structlog; from broker.core.logs import configure_from_env; configure_from_env(); "
    "log = structlog.get_logger('w'); log.info('below_the_level'); log.warning('worker_event', n=1)"
)


@pytest.fixture
def restored_env():
    saved = {k: os.environ.get(k) for k in (LEVEL_ENV, JSON_ENV)}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    configure("info")  # what the other tests expect
    os.environ.pop(LEVEL_ENV, None)
    os.environ.pop(JSON_ENV, None)


def test_a_worker_started_after_configure_logs_the_same_way_to_stderr(restored_env: None):
    configure("warning", json=True)
    assert (os.environ[LEVEL_ENV], os.environ[JSON_ENV]) == ("warning", "1")
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"], event["n"]) == ("worker_event", "warning", 1)
