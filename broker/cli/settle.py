"""``broker settle``: close a day, exchange batches, handle disputes, confirm, report.

Every command reads the node's config and works on its ledger database;
the exchanges go to the peers' nodes over mutual TLS with this node's
certificate, signed with its settlement key. Run them on a running system:
a close only fixes what it covers (durably) and then sends, so a close
interrupted at any point is finished by running it again.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from broker.cards.model import Entitlement
from broker.cli.output import broker_errors, err, plain_console, yuan
from broker.core.errors import (
    ConfigError,
    DocumentRefused,
    PeerUnavailable,
    SettlementStateError,
)
from broker.core.priority import to_background
from broker.fares.rules import load_fares
from broker.node.config import NodeConfig, load_config
from broker.settlement.clearing.check import check_day
from broker.settlement.clearing.positions import positions, settled_day
from broker.settlement.clearing.reports import operator_statement
from broker.settlement.clearing.sender import Sender
from broker.settlement.clearing.session import open_sender
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.days import require_ended, require_window_closed

config_option = click.option(
    "--config", "config_path", required=True, type=click.Path(path_type=Path)
)
period_option = click.option(
    "--period", required=True, help="Settlement day, YYYY-MM-DD (Asia/Shanghai)."
)


def _day(period: str) -> date:
    try:
        return date.fromisoformat(period)
    except ValueError:
        raise click.BadParameter("must be YYYY-MM-DD", param_hint="--period") from None


def _config(path: Path) -> NodeConfig:
    cfg = load_config(path, os.environ)
    if cfg.ledger.path is None and cfg.ledger.url is None:
        raise ConfigError("[ledger] is not configured: this node keeps no trips")
    return cfg


def _progress() -> Callable[[str, int], None]:
    shown = [0]

    def progress(what: str, n: int) -> None:
        if n - shown[0] >= 100_000:
            shown[0] = n
            err.print(f"  {n:,} {what}")

    return progress


def _clock() -> Callable[[], datetime]:
    """The commands' time: the wall clock, unless the caller of ``main`` passed
    ``obj={"clock": ...}`` (the end-to-end tests run a settlement day on a clock of their own).
    """
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    clock = obj.get("clock") if isinstance(obj, dict) else None
    return clock if callable(clock) else (lambda: datetime.now(UTC))


def _run(cfg_path: Path, work: Callable[[Sender], Any], behind_gates: bool = False) -> Any:
    """``work`` on a sender; ``behind_gates``: this process on the workers' CPUs
    (``settlement.worker_cpus``, if set) at their priority, as a close that runs for minutes
    on the node's machine should be."""

    async def go() -> Any:
        cfg = _config(cfg_path)
        if behind_gates and cfg.settlement.worker_cpus:
            try:
                to_background(cpus=cfg.settlement.worker_cpus)
            except ConfigError as exc:
                raise ConfigError(f"settlement.worker_cpus: {exc}") from exc
        async with open_sender(cfg, _progress(), _clock()) as sender:
            return await work(sender)

    with broker_errors():
        return asyncio.run(go())


def _emit(rows: list[dict[str, Any]], fmt: str, title: str, money: set[str]) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["none"])
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
        return
    table = Table(title=title)
    cols = list(rows[0]) if rows else []
    for col in cols:
        table.add_column(col.replace("_fen", "").replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*(yuan(row[c]) if c in money else str(row[c]) for c in cols))
    plain_console(width=140).print(table)


@click.group()
def settle() -> None:
    """Settlement between districts (see docs/operations.md)."""


@settle.command("close")
@config_option
@period_option
@click.option(
    "--force", is_flag=True, help="Close a day that has not ended yet (trips of it may follow)."
)
def close_cmd(config_path: Path, period: str, force: bool) -> None:
    """Close a day: publish fare rules, send a signed batch to each home district, store acks.

    Run again after trips for a closed day arrived: they go in a supplementary
    batch. Run again after an interruption: it resumes where it stopped. The
    first close after the day's late window (its end + 72 h + 5 min) seals the
    day: no trip of it is accepted after that, and it may be confirmed.
    """
    day = _day(period)
    report = _run(config_path, lambda s: s.close(day, force), behind_gates=True)
    rows = [asdict(b) for b in report.batches]
    _emit(
        rows,
        "table",
        f"close {report.period} (close #{report.close_no})",
        {"claimed_fen", "accepted_claim_fen"},
    )
    if not rows and not report.failures:
        click.echo("nothing new to send")
    for failure in report.failures:
        err.print(Text.assemble(("not sent:", "red"), f" {failure} (run the close again)"))
    if report.failures:
        sys.exit(1)


@settle.command("represent")
@config_option
@click.option("--district", "counterparty", required=True, help="The home district.")
@click.option("--operator", "operator_id", required=True)
@click.option("--trip", "trip_id", required=True)
@click.option(
    "--entitlement", type=click.Choice(["none", *(e.name.lower() for e in Entitlement if e.value)])
)
@click.option("--charged-fen", type=int)
@click.option("--concession-fen", type=int)
def represent_cmd(
    config_path: Path,
    counterparty: str,
    operator_id: str,
    trip_id: str,
    entitlement: str | None,
    charged_fen: int | None,
    concession_fen: int | None,
) -> None:
    """Send a corrected line for a rejected one, once; a second rejection is final."""
    corrections: dict[str, Any] = {}
    if entitlement is not None:
        corrections["applied_entitlement"] = (
            None if entitlement == "none" else Entitlement[entitlement.upper()]
        )
    if charged_fen is not None:
        corrections["charged_fen"] = charged_fen
    if concession_fen is not None:
        corrections["concession_fen"] = concession_fen
    result = _run(
        config_path, lambda s: s.represent(counterparty, operator_id, trip_id, corrections)
    )
    click.echo("accepted" if result.rejected == 0 else "rejected again: the dispute is final")


@settle.command("resolve")
@config_option
@click.option("--district", "counterparty", required=True)
@click.option("--operator", "operator_id", required=True)
@click.option("--trip", "trip_id", required=True)
@click.option("--note", required=True, help="What was agreed, by whom.")
def resolve_cmd(
    config_path: Path, counterparty: str, operator_id: str, trip_id: str, note: str
) -> None:
    """Close a dispute by hand, with a note."""

    async def work(s: Sender) -> None:
        s.resolve(counterparty, operator_id, trip_id, note)

    _run(config_path, work)
    click.echo("resolved")


@settle.command("confirm")
@config_option
@period_option
def confirm_cmd(config_path: Path, period: str) -> None:
    """Agree the day's position with every counterparty; agreed days become SETTLED.

    A day is confirmed only after its late window has closed and a close ran
    after that. A SETTLED day is shown from the two signed position documents
    stored when it was agreed. Exit status 1 unless every position is SETTLED. A day
    that has not ended, or whose late window is open, is refused whether or not it has
    positions yet.
    """
    day = _day(period)
    with broker_errors():
        now = _clock()()
        require_ended(day, now, "confirm")
        require_window_closed(day, now)

    async def work(s: Sender) -> list[dict[str, Any]]:
        out = []
        for p in positions(s.store, day, s.cfg.district):
            note = ""
            try:
                p = await s.confirm(p.counterparty, day)
                if p.state != "settled":
                    note = "the two views differ: see `broker settle statement --district`"
                elif settled_day(s.store.db, p.counterparty, day) is None:
                    note = "agreed under the previous release: its figures, no signed documents"
            except (PeerUnavailable, SettlementStateError, DocumentRefused) as exc:
                note = str(exc)
            out.append(
                {
                    "counterparty": p.counterparty,
                    "net_fen": p.net_fen,
                    "state": p.state,
                    "note": note,
                }
            )
        return out

    rows = _run(config_path, work)
    _emit(rows, "table", f"confirm {period}", {"net_fen"})
    if any(r["state"] != "settled" for r in rows):
        sys.exit(1)


@settle.command("check")
@config_option
@period_option
def check_cmd(config_path: Path, period: str) -> None:
    """Prove the day: every accepted trip in exactly one batch (or not closed yet), and
    every acknowledgement naming its batch as sent. Exit status 1 if anything does not hold.
    """
    day = _day(period)
    with broker_errors():
        cfg = _config(config_path)
        store = ClearingStore.open(cfg)
        try:
            found = check_day(store, cfg.district, day)
        finally:
            store.close()
    click.echo(
        f"{found.period}: {found.accepted} accepted trip(s) of neighbours' card-holders, "
        f"{found.in_batches} in batches, {found.not_closed} not closed yet; "
        f"{found.batches} batch(es), {found.acknowledged} acknowledged"
    )
    for problem in found.problems:
        click.echo(f"PROBLEM: {problem}")
    if not found.clean:
        sys.exit(1)


@settle.command("disputes")
@config_option
@click.option("--period", default=None)
@click.option("--format", "fmt", default="table", type=click.Choice(["table", "json", "csv"]))
def disputes_cmd(config_path: Path, period: str | None, fmt: str) -> None:
    """Lines the home districts rejected, and where each dispute stands."""
    with broker_errors():
        store = ClearingStore.open(_config(config_path))
        try:
            rows = store.disputes(_day(period) if period else None)
        finally:
            store.close()
    _emit(rows, fmt, "disputes", set())


@settle.command("statement")
@config_option
@period_option
@click.option("--operator", "operator_id", default=None, help="One operator's statement.")
@click.option(
    "--district",
    "by_district",
    is_flag=True,
    help="This district's net positions with each counterparty.",
)
@click.option("--format", "fmt", default="table", type=click.Choice(["table", "json", "csv"]))
def statement_cmd(
    config_path: Path, period: str, operator_id: str | None, by_district: bool, fmt: str
) -> None:
    """What operators are owed (default), or the district's net positions (``--district``)."""
    day = _day(period)
    with broker_errors():
        cfg = _config(config_path)
        fares = load_fares(cfg.fares.file) if cfg.fares.file else None
        store = ClearingStore.open(cfg)
        try:
            if by_district:
                rows: list[dict[str, Any]] = [
                    {
                        "counterparty": p.counterparty,
                        "receivable_fen": p.receivable_fen,
                        "payable_fen": p.payable_fen,
                        "net_fen": p.net_fen,
                        "state": p.state,
                        "open_disputes": p.open_disputes,
                    }
                    for p in positions(store, day, cfg.district)
                ]
                if fmt == "json":
                    click.echo(
                        json.dumps(
                            {
                                "district": cfg.district,
                                "period": period,
                                "positions": rows,
                                "multilateral_net_fen": sum(r["net_fen"] for r in rows),
                            },
                            indent=2,
                        )
                    )
                    return
                _emit(
                    rows,
                    fmt,
                    f"{cfg.district} · {period} · net positions (yuan)",
                    {"receivable_fen", "payable_fen", "net_fen"},
                )
                if fmt == "table":
                    click.echo(f"multilateral net: {yuan(sum(r['net_fen'] for r in rows))}")
                return
            lines = operator_statement(cfg, fares, store, day, operator_id)
        finally:
            store.close()
    rows = [asdict(line) for line in lines]
    if fmt == "json":
        click.echo(json.dumps({"period": period, "operator": operator_id, "lines": rows}, indent=2))
        return
    money = (
        {f.name for f in fields(lines[0])} - {"home_district", "trips", "rejected_trips"}
        if lines
        else set()
    )
    _emit(rows, fmt, f"{period} · {operator_id or 'all operators'} (yuan)", money)
