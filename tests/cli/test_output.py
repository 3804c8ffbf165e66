"""broker/cli/output.py: ``error:`` lines and exit codes, BrokerError mapping, yuan formatting,
and consoles that print machine values verbatim (no emoji, markup or wrapping)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rich.table import Table

from broker.cli.output import broker_errors, fail, plain_console, yuan
from broker.core.errors import BrokerError, ConfigError, InvalidArgument

# A CA fingerprint as `openssl x509 -fingerprint -sha256` prints it, with the bytes CD and AB
# where Rich's ':name:' emoji codes land: by default Rich prints 96:CD:22 as 96💿22.
FINGERPRINT = ":".join(["96", "CD", "22", "AB"] * 8)
# A message an operator copies from: a fingerprint, markup-like brackets, a long path.
MESSAGE = (
    f"bundle of 512021 has CA {FINGERPRINT}, not the one held; "
    f"see /srv/yikatong/[ledger]/a:cd:b/{'long-directory-name/' * 4}bundle.json"
)


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


def test_fail_prints_a_fingerprint_brackets_and_a_long_path_verbatim_on_one_line(capsys):
    """Piped (pytest's stderr is no terminal), Rich would wrap at 80 columns and make emoji."""
    assert len(MESSAGE) > 160 and ":CD:" in MESSAGE  # the premise
    with pytest.raises(SystemExit):
        fail(MESSAGE)
    assert capsys.readouterr().err == f"error: {MESSAGE}\n"


def test_fail_does_not_wrap_in_a_40_column_terminal_width():
    """COLUMNS=40, as a narrow terminal or a CI runner sets it, in a fresh process."""
    script = "import sys; from broker.cli.output import fail; fail(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", script, MESSAGE],
        env={**os.environ, "COLUMNS": "40"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr == f"error: {MESSAGE}\n"


def test_a_plain_console_prints_lines_whole_whatever_its_width(capsys):
    plain_console(width=40).print(MESSAGE)
    plain_console(stderr=True, width=40).print(MESSAGE)
    assert capsys.readouterr() == (f"{MESSAGE}\n", f"{MESSAGE}\n")


def test_a_plain_consoles_table_shows_cells_as_text():
    """Table cells (dispute notes, serials) are not markup or emoji codes either."""
    console = plain_console(width=200)
    table = Table()
    table.add_column("note", no_wrap=True)
    table.add_row(f"[red]agreed[/red] :cd: {FINGERPRINT}")
    with console.capture() as captured:
        console.print(table)
    assert f"[red]agreed[/red] :cd: {FINGERPRINT}" in captured.get()
