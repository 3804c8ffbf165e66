"""``broker settle``: settlement from the command line (statements so far)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import asdict
from datetime import date
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from broker.config import load_config
from broker.errors import BrokerError
from broker.fares import load_fares
from broker.ledger import open_ledger
from broker.statements import statement


def yuan(fen: int) -> str:
    """Integer fen shown as yuan, without ever passing through a float."""
    return f"{'-' if fen < 0 else ''}{abs(fen) // 100}.{abs(fen) % 100:02d}"


@click.group()
def settle() -> None:
    """Settlement between districts (see docs/operations.md)."""


@settle.command("statement")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.option("--period", required=True, help="Settlement day, YYYY-MM-DD (Asia/Shanghai).")
@click.option("--operator", "operator_id", default=None, help="One operator (default: all).")
@click.option("--format", "fmt", default="table", type=click.Choice(["table", "json", "csv"]))
def statement_cmd(config_path: Path, period: str, operator_id: str | None, fmt: str) -> None:
    """What operators are owed for a day's accepted trips, per card-holders' home district."""
    try:
        day = date.fromisoformat(period)
    except ValueError:
        raise click.BadParameter("must be YYYY-MM-DD", param_hint="--period") from None
    try:
        cfg = load_config(config_path, os.environ)
        fares = load_fares(cfg.fares_file) if cfg.fares_file else None
        ledger = open_ledger(cfg.ledger_path, cfg.ledger_url, cfg.ledger_schema)
    except BrokerError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        sys.exit(1)
    try:
        lines = statement(
            ledger.accepted_trips(day, operator_id), cfg.district, cfg.agreement, fares
        )
    finally:
        ledger.close()
    rows = [asdict(line) for line in lines]
    if fmt == "json":
        click.echo(json.dumps({"period": period, "operator": operator_id, "lines": rows}, indent=2))
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["home_district"])
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
    else:
        table = Table(title=f"{period} · {operator_id or 'all operators'} (yuan)")
        for col in ("home district", "trips", "gross", "charged", "concession", "claimed"):
            table.add_column(col, justify="left" if col == "home district" else "right")
        for line in lines:
            table.add_row(
                line.home_district,
                str(line.trips),
                yuan(line.gross_fen),
                yuan(line.charged_fen),
                yuan(line.concession_fen),
                yuan(line.claimed_fen),
            )
        Console(width=120).print(table)
