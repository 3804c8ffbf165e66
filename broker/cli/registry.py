"""``broker registry``: the district's own card-holders (import; report lost, suspend, restore)."""

from __future__ import annotations

import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import click

from broker.cards import status_log
from broker.cards.csv_import import parse_import
from broker.cards.model import shanghai_day
from broker.cards.privacy import load_key_file
from broker.cards.registry import Registry
from broker.cards.status_change import SETTABLE, parse_card_numbers, set_status
from broker.cli.output import broker_errors, err, fail
from broker.core.errors import BrokerError, ImportRejected
from broker.node.config import NodeConfig, load_config


def _config(path: Path) -> NodeConfig:
    with broker_errors():
        return load_config(path, os.environ)


@click.group()
def registry() -> None:
    """The district's own card-holder registry."""


@registry.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
def registry_import(csv_file: Path, config_path: Path) -> None:
    """Import card-holders (upsert, never delete); a file with any bad row is refused whole.

    Every change it records is logged for the peers that asked about the card.
    """
    cfg = _config(config_path)
    now = datetime.now(UTC)
    try:
        hasher = load_key_file(cfg.privacy.hash_key_file)
        with csv_file.open(newline="", encoding="utf-8") as fh:
            rows = parse_import(fh, shanghai_day(now), hasher)
    except ImportRejected as exc:
        for row_error in exc.errors:
            err.print(f"{csv_file}:{row_error}")
        fail(f"{csv_file}: {exc}")
    except BrokerError as exc:
        fail(str(exc))
    store = Registry(cfg.registry)
    try:
        result = store.upsert(rows, now)
    finally:
        store.close()
    click.echo(
        f"imported {result.rows} rows: {result.inserted} new, {result.updated} updated, "
        f"{result.unchanged} unchanged, {result.status_changes} status change(s) recorded"
    )


@registry.command("set-status")
@click.option("--status", required=True, type=click.Choice(SETTABLE))
@click.option(
    "--cards",
    "cards_file",
    type=click.File("r", encoding="utf-8"),
    default="-",
    show_default="stdin",
    help="Card numbers, one per line (# starts a comment). Never on the command line.",
)
@click.option(
    "--changed-at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"]),
    help="When it took effect (a loss: when it was reported), with its UTC offset; default now.",
)
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.pass_context
def registry_set_status(
    ctx: click.Context,
    status: str,
    cards_file: TextIO,
    changed_at: datetime | None,
    config_path: Path,
) -> None:
    """Report cards lost, suspend them, or make them active again: all listed cards in one
    transaction, each change logged for the peers that asked about the card (they refuse a
    lost or suspended card at once; an active one is asked about again)."""
    cfg = _config(config_path)
    clock = (ctx.obj or {}).get("clock") or (lambda: datetime.now(UTC))
    if cards_file is sys.stdin and sys.stdin.isatty():
        err.print("reading card numbers from the terminal, one per line; end with Ctrl-D")
    numbers = parse_card_numbers(cards_file.read())
    if not numbers:
        fail("no card numbers given (one per line, from --cards FILE or stdin)")
    store = Registry(cfg.registry)
    try:
        with broker_errors():
            result = set_status(store, numbers, status, clock(), changed_at)
    finally:
        store.close()
    events = f"events {result.first_seq}-{result.last_seq}" if result.first_seq else "no events"
    click.echo(
        f"{status}: {result.changed} card(s) changed, {result.unchanged} already so; {events}"
    )
    if result.unknown:
        lines = ", ".join(str(p) for p in result.unknown)
        err.print(f"{len(result.unknown)} card number(s) not in this registry (lines {lines})")
        sys.exit(1)


@registry.command("reset-log")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
def registry_reset_log(config_path: Path) -> None:
    """Start a new history of the status log (a new epoch): after restoring the registry
    from a copy, so that every peer drops its cached answers of this district and asks
    again, whatever changes the copy lacks. Run it with the nodes stopped or running."""
    cfg = _config(config_path)
    store = Registry(cfg.registry)
    try:
        head = status_log.reset(store.db, secrets.token_hex(16), datetime.now(UTC))
    finally:
        store.close()
    click.echo(f"status log reset: epoch {head.epoch}; peers will drop this district's answers")
