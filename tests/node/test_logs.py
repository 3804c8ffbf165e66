"""Logging setup (broker/node/logs.py): JSON lines or console text on stderr, level filtering."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from broker.node.logs import StdlibToStructlog, configure


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """configure() binds the stderr of this test and takes over the root logger; give later
    tests the configuration back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    out, err = capsys.readouterr()
    assert out == ""  # logs never go to stdout, which commands use for their output
    return err.splitlines()


def test_json_mode_writes_one_parseable_json_object_per_event(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("info", json=True)
    log = structlog.get_logger("broker.test")
    log.info("node_started", district="500111", port=7443)
    log.warning("call_refused", method="/yikatong.v1.Gate/Check")
    lines = stderr_lines(capsys)
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "node_started" and first["level"] == "info"
    assert (first["district"], first["port"]) == ("500111", 7443)
    assert (second["event"], second["level"]) == ("call_refused", "warning")
    stamp = datetime.fromisoformat(first["timestamp"])
    assert stamp.utcoffset() == timedelta(0)  # ISO 8601 in UTC
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)


def test_events_below_the_level_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    configure("warning", json=True)
    log = structlog.get_logger("broker.test")
    log.debug("too_quiet")
    log.info("still_too_quiet")
    log.warning("heard")
    log.error("heard_too")
    events = [json.loads(line)["event"] for line in stderr_lines(capsys)]
    assert events == ["heard", "heard_too"]


def test_the_default_level_is_info_and_the_level_name_is_case_insensitive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(json=True)
    log = structlog.get_logger("broker.test")
    log.debug("dropped")
    log.info("kept")
    assert [json.loads(line)["event"] for line in stderr_lines(capsys)] == ["kept"]
    configure("ERROR", json=True)
    log.warning("dropped")
    log.error("kept")
    assert [json.loads(line)["event"] for line in stderr_lines(capsys)] == ["kept"]


def test_an_exception_is_rendered_into_the_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure("info", json=True)
    try:
        raise ValueError("ledger closed")
    except ValueError:
        structlog.get_logger("broker.test").exception("handler_failed", method="/x.Y/Z")
    (line,) = stderr_lines(capsys)
    record = json.loads(line)
    assert record["level"] == "error" and record["event"] == "handler_failed"
    assert "ValueError: ledger closed" in record["exception"]


def test_console_mode_writes_plain_text_without_colour_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("info", json=False)
    structlog.get_logger("broker.test").info("node_started", district="500111")
    (line,) = stderr_lines(capsys)
    assert "node_started" in line and "district=500111" in line and "info" in line
    assert "\x1b[" not in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_an_unknown_level_name_is_refused() -> None:
    with pytest.raises(KeyError):
        configure("chatty")


def test_standard_library_records_become_json_lines_naming_their_logger(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """asyncio and grpc's Python layer log through :mod:`logging`, not structlog."""
    configure("info", json=True)
    logging.getLogger("asyncio").warning("Task %s took %.1f s", "gate-7", 1.5)
    try:
        raise RuntimeError("servicer blew up")
    except RuntimeError:
        logging.getLogger("grpc._cython.cygrpc").exception("Unexpected error in servicer")
    first, second = (json.loads(line) for line in stderr_lines(capsys))
    assert (first["logger"], first["level"]) == ("asyncio", "warning")
    assert first["event"] == "Task gate-7 took 1.5 s"
    assert (second["logger"], second["level"]) == ("grpc._cython.cygrpc", "error")
    assert "RuntimeError: servicer blew up" in second["exception"]  # one line, not a traceback


def test_standard_library_records_follow_the_level_and_stay_off_at_debug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Below the level: dropped. At ``debug``, libraries' debug chatter is dropped too."""
    configure("warning", json=True)
    logging.getLogger("asyncio").info("dropped")
    logging.getLogger("asyncio").log(35, "custom level between warning and error")
    (line,) = stderr_lines(capsys)
    assert json.loads(line)["level"] == "warning"  # custom levels round down
    configure("debug", json=True)
    logging.getLogger("grpc._cython.cygrpc").debug("Loaded running loop")
    structlog.get_logger("broker.test").debug("recognized")
    assert [json.loads(line)["event"] for line in stderr_lines(capsys)] == ["recognized"]


def test_configuring_again_replaces_the_bridge_instead_of_adding_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("info", json=False)
    configure("info", json=True)
    assert sum(isinstance(h, StdlibToStructlog) for h in logging.getLogger().handlers) == 1
    logging.getLogger("asyncio").warning("once")
    (line,) = stderr_lines(capsys)
    assert json.loads(line)["event"] == "once"
