"""broker/cli/settle.py: the ``broker settle`` commands that need no running peer.

Reports on an empty ledger in each format, the refusals the command makes itself
(no [ledger], no settlement key, a period that is not a date, a resolution without a
note) and a close with nothing to send. Closes and confirms that exchange batches with
peers run in tests/e2e/test_clearing_checks.py and tests/e2e/test_clearing_crash.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.cards.model import shanghai_day
from broker.cli.main import main
from broker.node.config import render_config
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.config import LedgerConfig, SettlementKeyConfig
from broker.testbed.build import DistrictSetup, build
from tests.helpers import run_cli

D = "500111"
PERIOD = "2026-01-05"


def settle(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["settle", *args, "--config", str(config)])


def flat(text: str) -> str:
    """The output with Rich's line wrapping undone."""
    return " ".join(text.split())


def csv_rows(text: str) -> list[list[str]]:
    """The data rows of CSV output (the header line dropped)."""
    return list(csv.reader(io.StringIO(text)))[1:]


@pytest.fixture
def district(tmp_path: Path, now: datetime) -> DistrictSetup:
    """One district with an empty ledger and no peers."""
    return build(tmp_path, (D,), now, cards_per_district=1)[D]


@pytest.fixture
def no_ledger(district: DistrictSetup, tmp_path: Path) -> Path:
    """The same node's config without a [ledger] section."""
    path = tmp_path / "no-ledger.toml"
    path.write_text(render_config(replace(district.config, ledger=LedgerConfig())))
    assert "[ledger]" not in path.read_text()
    return path


def test_statement_json_on_an_empty_ledger_has_no_lines(district: DistrictSetup):
    result = settle(district.config_path, "statement", "--period", PERIOD, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"period": PERIOD, "operator": None, "lines": []}


def test_statement_json_names_the_operator_asked_for(district: DistrictSetup):
    result = settle(
        district.config_path, "statement", "--period", PERIOD, "--operator", "bus-01",
        "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["operator"] == "bus-01"


@pytest.mark.parametrize("by_district", [(), ("--district",)])
def test_statement_csv_on_an_empty_ledger_has_no_data_rows(
    district: DistrictSetup, by_district: tuple[str, ...]
):
    result = settle(
        district.config_path, "statement", "--period", PERIOD, *by_district, "--format", "csv"
    )
    assert result.exit_code == 0, result.output
    assert csv_rows(result.stdout) == []


def test_statement_by_district_json_on_an_empty_day_nets_to_zero(district: DistrictSetup):
    result = settle(
        district.config_path, "statement", "--period", PERIOD, "--district", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "district": D,
        "period": PERIOD,
        "positions": [],
        "multilateral_net_fen": 0,
    }


def test_statement_by_district_table_prints_a_zero_multilateral_net(district: DistrictSetup):
    result = settle(district.config_path, "statement", "--period", PERIOD, "--district")
    assert result.exit_code == 0, result.output
    assert "multilateral net: 0.00" in result.stdout


@pytest.mark.parametrize("period", [(), ("--period", PERIOD)])
def test_disputes_json_lists_none_on_an_empty_ledger(
    district: DistrictSetup, period: tuple[str, ...]
):
    result = settle(district.config_path, "disputes", *period, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_disputes_csv_lists_none_on_an_empty_ledger(district: DistrictSetup):
    result = settle(district.config_path, "disputes", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert csv_rows(result.stdout) == []


def test_resolve_without_a_note_is_a_usage_error(district: DistrictSetup):
    result = settle(
        district.config_path, "resolve", "--district", "512021", "--operator", "bus-01",
        "--trip", "t-1",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--note" in result.output


@pytest.mark.parametrize("note", ["", "   "])
def test_resolve_with_a_blank_note_is_refused(district: DistrictSetup, note: str):
    result = settle(
        district.config_path, "resolve", "--district", "512021", "--operator", "bus-01",
        "--trip", "t-1", "--note", note,
    )  # fmt: skip
    assert result.exit_code == 1
    assert "error: a resolution needs a note" in flat(result.output)


def test_resolve_of_a_dispute_that_does_not_exist_fails_clearly(district: DistrictSetup):
    result = settle(
        district.config_path, "resolve", "--district", "512021", "--operator", "bus-01",
        "--trip", "t-1", "--note", "agreed by phone with Anyue",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "no open or finally rejected dispute for bus-01/t-1" in flat(result.output)


def test_close_with_no_peers_and_no_trips_has_nothing_to_send(district: DistrictSetup):
    result = settle(district.config_path, "close", "--period", PERIOD)
    assert result.exit_code == 0, result.output
    assert "nothing new to send" in result.stdout
    assert "not sent" not in result.output


def test_a_day_that_has_not_ended_is_not_closed_unless_forced(
    district: DistrictSetup, now: datetime
):
    """Today (Asia/Shanghai) by the wall clock: refused, saying when it ends; --force closes."""
    today = shanghai_day(now)
    result = settle(district.config_path, "close", "--period", today.isoformat())
    assert result.exit_code == 1
    ends = (today + timedelta(days=1)).isoformat() + "T00:00+08:00"
    assert f"cannot close {today}: the day has not ended; it ends at {ends}" in flat(result.output)
    forced = settle(district.config_path, "close", "--period", today.isoformat(), "--force")
    assert forced.exit_code == 0, forced.output
    assert "nothing new to send" in forced.stdout


def test_confirm_has_no_force(district: DistrictSetup):
    result = settle(district.config_path, "confirm", "--period", PERIOD, "--force")
    assert result.exit_code == 2
    assert "No such option '--force'" in result.output


def test_the_commands_take_their_clock_from_the_caller(district: DistrictSetup, now: datetime):
    """``main(obj={"clock": ...})``: what the end-to-end tests use to run a day of their own."""
    today = shanghai_day(now).isoformat()
    out = run_cli(
        "settle",
        "close",
        "--config",
        str(district.config_path),
        "--period",
        today,
        clock=lambda: now + timedelta(days=1),
    )
    assert "nothing new to send" in out


@pytest.mark.parametrize(
    "args",
    [
        ("close", "--period", PERIOD),
        ("statement", "--period", PERIOD),
        ("disputes",),
        ("resolve", "--district", "512021", "--operator", "o", "--trip", "t", "--note", "n"),
    ],
)
def test_commands_against_a_node_without_a_ledger_are_refused(no_ledger: Path, args):
    result = settle(no_ledger, *args)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a reported error, not a traceback
    assert "error: [ledger] is not configured: this node keeps no trips" in flat(result.output)


def test_close_without_a_settlement_key_is_refused(district: DistrictSetup, tmp_path: Path):
    path = tmp_path / "no-key.toml"
    path.write_text(render_config(replace(district.config, settlement=SettlementKeyConfig())))
    result = settle(path, "close", "--period", PERIOD)
    assert result.exit_code == 1
    assert "key_file is not set: this node cannot sign batches" in flat(result.output)


def test_a_missing_config_file_is_refused(tmp_path: Path):
    missing = tmp_path / "none.toml"
    result = settle(missing, "statement", "--period", PERIOD)
    assert result.exit_code == 1
    assert f"config file {missing} does not exist" in flat(result.output)


@pytest.mark.parametrize("command", ["close", "confirm", "statement"])
@pytest.mark.parametrize("period", ["yesterday", "2026-02-30", "2026-13-01", "05/01/2026", ""])
def test_a_period_that_is_not_a_date_is_refused_before_the_config_is_read(
    tmp_path: Path, command: str, period: str
):
    """A missing config would exit 1: exit 2 shows the period was checked first."""
    result = settle(tmp_path / "not-read.toml", command, "--period", period)
    assert result.exit_code == 2
    assert "Invalid value for --period: must be YYYY-MM-DD" in flat(result.output)


def test_disputes_refuses_a_period_that_is_not_a_date(district: DistrictSetup):
    result = settle(district.config_path, "disputes", "--period", "someday")
    assert result.exit_code == 2
    assert "must be YYYY-MM-DD" in result.output


def test_confirm_says_a_day_agreed_under_the_previous_release_has_no_signed_documents(
    district: DistrictSetup,
):
    """That release kept only the agreed figures (``positions``): the day is still settled,
    without asking anyone, and the row says it has no signed documents to show."""
    store = ClearingStore.open(district.config)
    try:
        store.db.execute(
            "INSERT INTO out_batches (counterparty, period, seq, kind, lo, hi, state, "
            "created_at) VALUES ('512021', ?, 1, 'close', 0, 0, 'acked', ?)",
            (PERIOD, "2026-01-06T01:00:00+00:00"),
        )
        store.db.execute(
            "INSERT INTO positions (counterparty, period, receivable_fen, payable_fen, state, "
            "confirmed_at) VALUES ('512021', ?, 300, 100, 'settled', ?)",
            (PERIOD, "2026-01-09T01:00:00+00:00"),
        )
    finally:
        store.close()
    result = settle(district.config_path, "confirm", "--period", PERIOD)
    assert result.exit_code == 0, result.output
    assert "settled" in result.output and "2.00" in result.output
    cells = flat(result.output.replace("│", " "))  # the note, wrapped within its cell
    assert "agreed under the previous release: its figures, no signed documents" in cells


WATCH_CLOSE = """
import os, sys
from broker.cli import settle
from broker.cli.main import main

opened = settle.open_sender

def watched(*args, **kwargs):  # where the close runs, as it starts its work
    idle = os.sched_getscheduler(0) == getattr(os, "SCHED_IDLE", -1)
    print("at", ",".join(map(str, sorted(os.sched_getaffinity(0)))), idle, flush=True)
    return opened(*args, **kwargs)

settle.open_sender = watched
main(["settle", "close", "--config", sys.argv[1], "--period", sys.argv[2]])
"""


@pytest.mark.parametrize("placed", [True, False])
def test_a_close_runs_on_the_workers_cpus_behind_the_gates_when_they_are_set(
    district: DistrictSetup, tmp_path: Path, placed: bool
):
    """In a process of its own: a process cannot raise its priority back."""
    usable = sorted(os.sched_getaffinity(0))
    cpus = (usable[-1],) if placed else ()
    settings = replace(district.config.settlement, worker_cpus=cpus)
    path = tmp_path / "placed.toml"
    path.write_text(render_config(replace(district.config, settlement=settings)))
    done = subprocess.run(
        [sys.executable, "-c", WATCH_CLOSE, str(path), PERIOD],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("at "))
    expected = str(usable[-1]) if placed else ",".join(map(str, usable))
    idle = placed and hasattr(os, "SCHED_IDLE")
    assert line.split() == ["at", expected, str(idle)]
    assert "nothing new to send" in done.stdout


def test_a_close_placed_on_a_cpu_the_machine_lacks_is_refused_naming_the_key(
    district: DistrictSetup, tmp_path: Path
):
    settings = replace(district.config.settlement, worker_cpus=(4095,))
    path = tmp_path / "absent-cpu.toml"
    path.write_text(render_config(replace(district.config, settlement=settings)))
    done = subprocess.run(
        [sys.executable, "-m", "broker", "settle", "close", "--config", str(path),
         "--period", PERIOD],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "settlement.worker_cpus: cannot keep to CPU 4095" in " ".join(done.stderr.split())
