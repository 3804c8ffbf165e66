"""``broker registry``: import card-holders; set a card's status from a file or stdin."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cards import status_log
from broker.cards.model import CardStatus, LogPosition
from broker.cards.registry import Registry
from broker.cli.main import main
from broker.node.config import load_config
from tests.cli.test_main import setup_district, ssn

HEADER = "card_number,ssn,status,disabled,student,valid_until\n"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    config = setup_district(tmp_path)
    cards = tmp_path / "cards.csv"
    cards.write_text(
        HEADER + f"A00000001,{ssn()},active,false,false,2030-01-01\n"
        f"A00000002,{ssn('19900101')},active,false,false,2030-01-01\n"
    )
    result = CliRunner().invoke(main, ["registry", "import", str(cards), "--config", str(config)])
    assert result.exit_code == 0, result.output
    return config


def registry_of(config: Path) -> Registry:
    return Registry(load_config(config, env={}).registry)


def test_a_card_reported_lost_from_a_file_is_lost_and_logged(config: Path, tmp_path: Path):
    listed = tmp_path / "lost.txt"
    listed.write_text("# reported at the counter\nA00000001\n")
    result = CliRunner().invoke(
        main,
        ["registry", "set-status", "--status", "lost", "--cards", str(listed),
         "--changed-at", "2026-11-29T08:15:00+08:00", "--config", str(config)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 card(s) changed" in result.output
    assert "A00000001" not in result.output
    reg = registry_of(config)
    try:
        assert reg.lookup("A00000001").status == "lost"  # type: ignore[union-attr]
        assert reg.lookup("A00000002").status == "active"  # type: ignore[union-attr]
        events = status_log.read(reg.db, LogPosition(status_log.head(reg.db).epoch, 0, ""))
        assert isinstance(events, list)
        last = events[-1]
        assert (last.card_number, last.status) == ("A00000001", CardStatus.LOST)
        assert last.changed_at.isoformat() == "2026-11-29T00:15:00+00:00"
    finally:
        reg.close()


def test_card_numbers_come_from_stdin_and_unknown_ones_are_named_by_line(config: Path):
    result = CliRunner().invoke(
        main,
        ["registry", "set-status", "--status", "suspended", "--config", str(config)],
        input="A00000002\nNOSUCH00001\n",
    )
    assert result.exit_code == 1
    assert "1 card(s) changed" in result.output
    assert "not in this registry (lines 2)" in result.output
    assert "NOSUCH00001" not in result.output
    reg = registry_of(config)
    try:
        assert reg.lookup("A00000002").status == "suspended"  # type: ignore[union-attr]
    finally:
        reg.close()


@pytest.mark.parametrize(
    "args",
    [
        ["A00000001"],  # a card number on the command line: no such argument
        ["--changed-at", "2026-11-29T08:15:00"],  # no UTC offset
        ["--status", "stolen"],
    ],
)
def test_what_is_not_accepted_is_a_usage_error_and_changes_nothing(config: Path, args: list[str]):
    result = CliRunner().invoke(
        main,
        ["registry", "set-status", "--status", "lost", *args, "--config", str(config)],
        input="A00000001\n",
    )
    assert result.exit_code == 2, result.output
    reg = registry_of(config)
    try:
        assert reg.lookup("A00000001").status == "active"  # type: ignore[union-attr]
    finally:
        reg.close()


def test_nothing_to_set_is_an_error(config: Path):
    result = CliRunner().invoke(
        main, ["registry", "set-status", "--status", "lost", "--config", str(config)], input="\n"
    )
    assert result.exit_code == 1
    assert "no card numbers" in result.output


def test_reset_log_starts_a_new_epoch(config: Path):
    reg = registry_of(config)
    before = status_log.head(reg.db)
    reg.close()
    result = CliRunner().invoke(main, ["registry", "reset-log", "--config", str(config)])
    assert result.exit_code == 0, result.output
    reg = registry_of(config)
    try:
        after = status_log.head(reg.db)
    finally:
        reg.close()
    assert after.epoch != before.epoch and after.seq == 0
    assert after.epoch in result.output
