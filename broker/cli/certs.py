"""``broker certs``: certificate operations for operations staff (see docs/operations.md)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from broker.cards.privacy import create_key_file
from broker.cli.output import fail
from broker.trust import certops
from broker.trust.certops import CertOpsError, DistrictPaths, RotationStage
from broker.trust.identity import Identity, node_identity, operator_identity
from broker.trust.pki import LEAF_DAYS

district_opt = click.option("--district", required=True, help="6-digit district code.")
dir_opt = click.option(
    "--dir",
    "root",
    default=Path("certs"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="The certs directory.",
)


def _paths(root: Path, district: str) -> DistrictPaths:
    try:
        node_identity(district)
    except ValueError as exc:
        fail(str(exc))
    return DistrictPaths(root, district)


def _identity(district: str, is_node: bool, operator_id: str | None) -> Identity:
    if is_node == (operator_id is not None):
        fail("give exactly one of --node or --operator ID")
    try:
        return (
            node_identity(district) if is_node else operator_identity(district, operator_id or "")
        )
    except ValueError as exc:
        fail(str(exc))


@click.group()
def certs() -> None:
    """District CAs, node and operator certificates, revocation (see docs/operations.md)."""


@certs.command("init-ca")
@district_opt
@dir_opt
def init_ca(district: str, root: Path) -> None:
    """Create a district's CA, revocation list, trust bundle and hash key."""
    paths = _paths(root, district)
    try:
        certops.init_ca(paths, datetime.now(UTC))
    except CertOpsError as exc:
        fail(str(exc))
    if not paths.hash_key.exists():
        create_key_file(paths.hash_key)
    click.echo(f"CA written under {paths.cas} (keys mode 0600); trust bundle {paths.ca_cert}")


@certs.command("issue")
@district_opt
@click.option("--node", "is_node", is_flag=True, help="The district node's certificate.")
@click.option("--operator", "operator_id", default=None, help="An operator's certificate.")
@click.option("--days", default=LEAF_DAYS, show_default=True, type=click.IntRange(1, 398))
@dir_opt
def issue(district: str, is_node: bool, operator_id: str | None, days: int, root: Path) -> None:
    """Issue a node or operator certificate with the district's active CA."""
    ident = _identity(district, is_node, operator_id)
    try:
        cert, _key = certops.issue_to_files(_paths(root, district), ident, datetime.now(UTC), days)
    except CertOpsError as exc:
        fail(str(exc))
    click.echo(f"{ident.spiffe_id} → {cert}")


@certs.command("rotate")
@district_opt
@click.option("--node", "is_node", is_flag=True)
@click.option("--operator", "operator_id", default=None)
@dir_opt
def rotate(district: str, is_node: bool, operator_id: str | None, root: Path) -> None:
    """Replace a certificate now: new key and certificate, same identity and lifetime."""
    ident = _identity(district, is_node, operator_id)
    paths = _paths(root, district)
    current = [c for i, c in certops.leaf_certificates(paths) if i == ident]
    if not current:
        fail(f"no certificate for {ident.spiffe_id} to rotate: issue one first")
    days = certops.lifetime_days(current[0])
    cert, _ = certops.issue_to_files(paths, ident, datetime.now(UTC), days)
    click.echo(f"{ident.spiffe_id} rotated → {cert}")


@certs.command("renew-due")
@district_opt
@dir_opt
def renew_due(district: str, root: Path) -> None:
    """Renew every certificate past half its lifetime (run it from a timer)."""
    try:
        renewed = certops.renew_due(_paths(root, district), datetime.now(UTC))
    except CertOpsError as exc:
        fail(str(exc))
    for path in renewed:
        click.echo(f"renewed {path}")
    click.echo(f"{len(renewed)} certificate(s) renewed")


@certs.command("rotate-ca")
@district_opt
@click.option(
    "--stage",
    required=True,
    type=click.Choice([s.value for s in RotationStage]),
    help="publish, then (after peers have the bundle) activate, then retire.",
)
@dir_opt
def rotate_ca(district: str, stage: str, root: Path) -> None:
    """Rotate the district CA in three stages, with old and new trusted while they overlap."""
    try:
        click.echo(
            certops.rotate_ca(_paths(root, district), RotationStage(stage), datetime.now(UTC))
        )
    except CertOpsError as exc:
        fail(str(exc))


@certs.command("revoke")
@district_opt
@click.option("--serial", required=True, help="Serial in hex, as `certs status` prints it.")
@dir_opt
def revoke(district: str, serial: str, root: Path) -> None:
    """Revoke a certificate: its serial joins the revocation list of the CA that issued it."""
    try:
        issuer = certops.revoke(_paths(root, district), serial, datetime.now(UTC))
    except CertOpsError as exc:
        fail(str(exc))
    click.echo(f"serial {serial} revoked in the list of CA {issuer}")


@certs.command("status")
@district_opt
@click.option("--json", "as_json", is_flag=True)
@dir_opt
def status(district: str, as_json: bool, root: Path) -> None:
    """Every CA and certificate with its time left; exits 1 if any is expired or under 1/3 left."""
    try:
        rows = certops.status(_paths(root, district), datetime.now(UTC))
    except CertOpsError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        table = Table()
        for col in ("kind", "subject", "serial", "not after", "left", "warning"):
            table.add_column(col)
        for r in rows:
            kind = f"{r.kind} (signing)" if r.active else r.kind
            left = f"{r.seconds_left / 86400:.1f} d ({r.fraction_left:.0%})"
            table.add_row(kind, r.subject, r.serial, r.not_after[:19], left, r.warning)
        Console(width=160).print(table)
    if any(r.failing for r in rows):
        sys.exit(1)
