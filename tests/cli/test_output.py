"""broker/cli/output.py: ``error:`` lines and exit codes, BrokerError mapping, yuan formatting."""

from __future__ import annotations

import pytest

from broker.cli.output import broker_errors, fail, yuan
from broker.core.errors import BrokerError, ConfigError, InvalidArgument


def test_yuan_formats_integer_fen_exactly():
    assert [yuan(f) for f in (0, 5, 100, 11500, 123456789, -250)] == [
        "0.00",
        "0.05",
        "1.00",
        "115.00",
        "1234567.89",
        "-2.50",
    ]


def test_yuan_keeps_the_sign_of_amounts_under_one_yuan():
    """-1 fen is -0.01, not 0.01 or -1.99 (floor division of a negative would give that)."""
    assert [yuan(f) for f in (-1, -99, -100, -101)] == ["-0.01", "-0.99", "-1.00", "-1.01"]


def test_yuan_is_exact_beyond_float_precision():
    """10**17 + 1 fen has no exact float: a float-based format would lose the last fen."""
    assert float(10**17 + 1) == float(10**17)  # the premise: a float cannot hold it
    assert yuan(10**17 + 1) == "1000000000000000.01"
    assert yuan(-(10**17) - 1) == "-1000000000000000.01"


def test_fail_prints_error_line_on_stderr_and_exits_with_the_code(capsys):
    with pytest.raises(SystemExit) as exited:
        fail("the disk is full", code=3)
    assert exited.value.code == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == "error: the disk is full"


def test_fail_exits_1_by_default(capsys):
    with pytest.raises(SystemExit) as exited:
        fail("nope")
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip() == "error: nope"


@pytest.mark.parametrize(
    "message",
    ["[ledger] is not configured: this node keeps no trips", "file /tmp/a[/b] unreadable"],
)
def test_fail_prints_messages_with_brackets_verbatim(capsys, message: str):
    """Config errors name TOML sections like [ledger]; they must reach the operator intact."""
    with pytest.raises(SystemExit) as exited:
        fail(message)
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"


@pytest.mark.parametrize(
    "exc",
    [BrokerError("plain"), ConfigError("no listen address"), InvalidArgument("card", "too short")],
)
def test_broker_errors_turns_any_broker_error_into_fail(capsys, exc: BrokerError):
    with pytest.raises(SystemExit) as exited, broker_errors():
        raise exc
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {exc}"


@pytest.mark.parametrize("exc", [ValueError("bad"), KeyError("k"), RuntimeError("boom")])
def test_broker_errors_lets_other_exceptions_through_unchanged(capsys, exc: Exception):
    """A bug must surface as its own traceback, not as a tidy 'error:' line."""
    with pytest.raises(type(exc)) as raised, broker_errors():
        raise exc
    assert raised.value is exc
    assert capsys.readouterr().err == ""


def test_broker_errors_lets_an_exit_inside_through():
    with pytest.raises(SystemExit) as exited, broker_errors():
        raise SystemExit(2)
    assert exited.value.code == 2


def test_broker_errors_is_silent_when_nothing_fails(capsys):
    ran = []
    with broker_errors():
        ran.append(True)
    assert ran == [True]
    assert capsys.readouterr() == ("", "")
