"""The ``broker`` command: a thin shell that parses, calls plain functions and prints."""

from __future__ import annotations

import os

# gRPC core reads this once, when grpc is first imported, and imports below do import it
# (broker.cli.settle, for one); the console script enters here. Why NONE: broker/node/logs.py.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import asyncio
import gc
import json
import signal
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import click
import structlog
from click.core import ParameterSource
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker.cards.privacy import create_key_file
from broker.cli.certs import certs
from broker.cli.output import err, fail, yuan
from broker.cli.registry import registry
from broker.cli.settle import settle
from broker.cli.trust import trust
from broker.core.errors import BrokerError
from broker.node import logs
from broker.node.config import NodeConfig, load_config

log = structlog.get_logger(__name__)


def _config(path: Path) -> NodeConfig:
    try:
        return load_config(path, os.environ)
    except BrokerError as exc:
        fail(str(exc))


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LogChoice:
    """How to log: ``--log-level`` and ``--log-json``, wherever on the command line."""

    level: str = "info"
    json: bool = False


def log_choice() -> LogChoice:
    """The choice made so far on the command line being run."""
    choice = click.get_current_context().meta.get("broker.log_choice")
    return choice if isinstance(choice, LogChoice) else LogChoice()


def _take_log_option(ctx: click.Context, param: click.Parameter, value: str | bool | None) -> None:
    """Apply ``--log-level`` or ``--log-json`` given before or after the (sub)command.

    A value given later on the command line wins: ``broker --log-level warning serve
    --log-level debug`` logs debug. Defaults never override what was given.
    """
    assert param.name is not None
    if ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT:
        return
    choice = log_choice()
    if param.name == "log_level":
        assert isinstance(value, str)
        choice = replace(choice, level=value)
    else:
        choice = replace(choice, json=bool(value))
    ctx.meta["broker.log_choice"] = choice  # meta is shared by the command's nested contexts
    logs.configure(choice.level, choice.json)


def log_options(*, show_default: bool) -> list[click.Option]:
    """``--log-level`` and ``--log-json``, for the ``broker`` group and each of its commands."""
    return [
        click.Option(
            ["--log-level"],
            type=click.Choice(LOG_LEVELS),
            default="info" if show_default else None,
            show_default=show_default,
            expose_value=False,
            callback=_take_log_option,
            help="Drop log events below this level.",
        ),
        click.Option(
            ["--log-json"],
            is_flag=True,
            expose_value=False,
            callback=_take_log_option,
            help="Log JSON lines instead of console text.",
        ),
    ]


def accept_log_options_after_commands(group: click.Group) -> None:
    """Let every command under ``group`` take the log options too: ``broker serve --log-json``."""
    for command in group.commands.values():
        taken = {p.name for p in command.params}
        command.params.extend(o for o in log_options(show_default=False) if o.name not in taken)
        if isinstance(command, click.Group):
            accept_log_options_after_commands(command)


@click.group(params=log_options(show_default=True))
@click.version_option(package_name="yikatong-broker")
def main() -> None:
    """yikatong-broker: the Sichuan-Chongqing one-card interoperability broker."""
    choice = log_choice()
    logs.configure(choice.level, choice.json)


main.add_command(certs)
main.add_command(registry)
main.add_command(trust)
main.add_command(settle)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
def serve(config_path: Path) -> None:
    """Run a district node (gRPC, mutual TLS only) until SIGINT or SIGTERM.

    Certificates, keys, CA bundles and revocation lists are re-read when their
    files change (and at once on SIGHUP); no restart is ever needed.
    """
    from broker.node.server import Node

    json_logs = log_choice().json

    async def run(cfg: NodeConfig) -> None:
        node = await Node.start(cfg)
        # Everything built at start-up lives as long as the process: move it out of the
        # collector's way, so full collections walk only what serving creates.
        gc.collect()
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, node.request_reload)
        if json_logs:
            log.info("node_serving", district=cfg.district, address=node.address)
        else:
            err.print(f"district {cfg.district} serving on {node.address}")
        await stop.wait()
        await node.stop(grace=5.0)

    try:
        asyncio.run(run(load_config(config_path, os.environ)))
    except BrokerError as exc:
        if json_logs:
            _exit_logged("serve_failed", error=str(exc))
        fail(str(exc))
    except Exception:
        if not json_logs:
            raise
        # A traceback printed by the interpreter would spread over many non-JSON lines.
        _exit_logged("serve_crashed", exc_info=True)


def _exit_logged(event: str, **fields: object) -> NoReturn:
    """Log ``event`` as an error and exit 1: how ``serve`` fails when it logs JSON."""
    log.error(event, **fields)
    sys.exit(1)


@main.group("hash-key")
def hash_key() -> None:
    """The secret behind keyed hashes of card numbers (shared by a district's replicas)."""


@hash_key.command("init")
@click.argument("path", type=click.Path(path_type=Path))
def hash_key_init(path: Path) -> None:
    """Write a new random hash key to PATH (mode 0600); refuses to overwrite."""
    try:
        create_key_file(path)
    except FileExistsError:
        fail(f"{path} already exists")
    click.echo(f"hash key written to {path}")


@main.command()
@click.option("--checks", default=3000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 1024))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--keep",
    type=click.Path(path_type=Path),
    default=None,
    help="Write certificates and registries here instead of a temp dir.",
)
def demo(checks: int, concurrency: int, as_json: bool, keep: Path | None) -> None:
    """Three districts on loopback recognising each other's cards at gates."""
    from broker.testbed.demo import run_demo

    logs.configure("warning", log_choice().json)

    def run(root: Path) -> None:
        with Progress(
            TextColumn("gate checks"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=as_json,
            disable=as_json,
        ) as progress:
            task = progress.add_task("checks", total=checks)
            report = asyncio.run(
                run_demo(root, checks, concurrency, on_progress=lambda n: progress.advance(task, n))
            )
        summary = report.as_dict()
        if as_json:
            click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        else:
            _print_summary(summary)
        if summary["mismatches"]:
            fail(f"{summary['mismatches']} decision(s) disagree with the registries")
        day = summary.get("settlement")
        if isinstance(day, dict) and day.get("nets_sum_fen"):
            fail("the day's multilateral net positions do not sum to zero")

    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        run(keep)
    else:
        with tempfile.TemporaryDirectory(prefix="yikatong-demo-") as tmp:
            run(Path(tmp))


SOURCES = ("HOME", "CACHE", "PEER", "OFFLINE_POLICY")


def _print_summary(summary: dict[str, object]) -> None:
    table = Table(title=f"{summary['checks']} gate checks in {summary['seconds']} s")
    table.add_column("gate")
    table.add_column("home")
    for col in (
        "checks",
        "allow",
        "deny",
        "HOME",
        "CACHE",
        "PEER",
        "OFFLINE",
        "charged ¥",
        "concession ¥",
        "p50 ms",
        "p99 ms",
    ):
        table.add_column(col, justify="right")
    pairs = summary["pairs"]
    assert isinstance(pairs, list)

    names: dict[str, str] = {}
    for p in pairs:
        names[p["gate_district"]] = p["gate_name"]
        names[p["home_district"]] = p["home_name"]
        table.add_row(
            p["gate_district"],
            p["home_district"],
            str(p["checks"]),
            str(p["allowed"]),
            str(p["denied"]),
            *(str(p["sources"].get(s, 0)) for s in SOURCES),
            yuan(p["charged_fen"]),
            yuan(p["concession_fen"]),
            f"{p['p50_ms']:.2f}",
            f"{p['p99_ms']:.2f}",
        )
    out = Console()
    if not out.is_terminal:
        out = Console(width=120)
    out.print(table)
    click.echo("districts: " + "; ".join(f"{c} {n}" for c, n in sorted(names.items())))
    click.echo(f"decisions that disagree with the registries: {summary['mismatches']}")
    day = summary.get("settlement")
    if isinstance(day, dict) and day:
        _print_day(day, out)


def _print_day(day: dict[str, Any], out: Console) -> None:
    table = Table(
        title=(
            f"settlement day {day['period']}: {day['trips']} trips "
            f"(+{day['duplicates_resubmitted']} resubmitted, stored once; "
            f"{day['late_trips']} after the close, in supplementary batches)"
        )
    )
    for col in (
        "district",
        "counterparty",
        "batches",
        "receivable ¥",
        "payable ¥",
        "net ¥",
        "disputes",
    ):
        table.add_column(col, justify="right")
    for code, rows in sorted(day["positions"].items()):
        for r in rows:
            table.add_row(
                code,
                r["counterparty"],
                str(r["batches"]),
                yuan(r["receivable_fen"]),
                yuan(r["payable_fen"]),
                yuan(r["net_fen"]),
                str(r["open_disputes"]),
            )
    out.print(table)
    nets = ", ".join(f"{c} {yuan(n)}" for c, n in sorted(day["multilateral_net_fen"].items()))
    click.echo(f"multilateral nets: {nets}; sum {yuan(day['nets_sum_fen'])}")


# Last, once every command is attached: each takes the log options after its name too.
accept_log_options_after_commands(main)
