"""``broker certs``: certificate operations for operations staff (see docs/operations.md)."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.table import Table

from broker.cards.privacy import create_key_file
from broker.cli.output import fail, plain_console
from broker.core.errors import ConfigError
from broker.node.config import load_config
from broker.trust import certops
from broker.trust.bundle import Bundle, BundleRefused
from broker.trust.certops import CertOpsError, DistrictPaths, RotationStage
from broker.trust.epochs import epoch_names, pinned_name, read_epoch
from broker.trust.identity import Identity, admin_identity, node_identity, operator_identity
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
        with certops.store_lock(paths, create=True):
            certops.init_ca(paths, datetime.now(UTC))
            if not paths.hash_key.exists():
                create_key_file(paths.hash_key)
    except CertOpsError as exc:
        fail(str(exc))
    click.echo(f"CA written under {paths.cas} (keys mode 0600)")
    click.echo(f"CA certificates: {paths.ca_cert}")
    click.echo(f"signed trust bundle: {paths.bundle}")


@certs.command("issue")
@district_opt
@click.option("--node", "is_node", is_flag=True, help="The district node's certificate.")
@click.option("--operator", "operator_id", default=None, help="An operator's certificate.")
@click.option(
    "--admin",
    "admin_id",
    default=None,
    help="A back-office certificate (spiffe://<code>.yikatong.cy/admin/<id>): health detail.",
)
@click.option("--days", default=LEAF_DAYS, show_default=True, type=click.IntRange(1, 398))
@dir_opt
def issue(
    district: str,
    is_node: bool,
    operator_id: str | None,
    admin_id: str | None,
    days: int,
    root: Path,
) -> None:
    """Issue a node, operator or admin certificate with the district's active CA."""
    if admin_id is not None:
        if is_node or operator_id is not None:
            fail("give exactly one of --node, --operator ID or --admin ID")
        try:
            ident = admin_identity(district, admin_id)
        except ValueError as exc:
            fail(str(exc))
    else:
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
@click.option(
    "--revoke-old",
    is_flag=True,
    help="Operators: revoke the replaced certificate in the same operation (a distrusted key).",
)
@click.option(
    "--next-epoch",
    is_flag=True,
    help="Node: begin a move to the next node epoch (a compromised node key; see the runbook).",
)
@dir_opt
def rotate(
    district: str,
    is_node: bool,
    operator_id: str | None,
    revoke_old: bool,
    next_epoch: bool,
    root: Path,
) -> None:
    """Replace a certificate now: new key and certificate, same identity and lifetime."""
    ident = _identity(district, is_node, operator_id)
    paths = _paths(root, district)
    try:
        done = certops.rotate(
            paths, ident, datetime.now(UTC), revoke_old=revoke_old, next_epoch=next_epoch
        )
    except CertOpsError as exc:
        fail(str(exc))
    click.echo(f"{ident.spiffe_id} rotated → {done.path} (serial {done.new_serial})")
    if done.revoked is not None:
        click.echo(f"old serial {done.old_serial} revoked in the list of CA {done.revoked.issuer}")
    else:
        click.echo(f"old serial {done.old_serial} stays valid until it expires")
    if next_epoch:
        names = " and ".join(epoch_names(district, done.epoch))
        click.echo(
            f"the new certificate names {names}; deploy it, then run `broker certs "
            f"publish-epoch`, then `broker certs revoke --serial {done.old_serial}`"
        )


@certs.command("publish-epoch")
@district_opt
@dir_opt
def publish_epoch(district: str, root: Path) -> None:
    """Complete a node epoch move: publish the bundle naming the next epoch."""
    paths = _paths(root, district)
    try:
        signed = certops.publish_epoch(paths, datetime.now(UTC))
    except CertOpsError as exc:
        fail(str(exc))
    bundle = Bundle.parse(signed.document)
    click.echo(f"bundle {bundle.sequence} names the node {bundle.node_name}")


@certs.command("epoch")
@district_opt
@dir_opt
def epoch(district: str, root: Path) -> None:
    """Show the node's epoch: the name peers pin, and a pending move."""
    paths = _paths(root, district)
    try:
        certops.active_ca_id(paths)  # a district this store has
        held = read_epoch(paths)
    except CertOpsError as exc:
        fail(str(exc))
    click.echo(f"epoch {held.current}: {pinned_name(district, held)}")
    if held.next is not None:
        click.echo(f"moving to epoch {held.next}: run `broker certs publish-epoch` once deployed")


@certs.command("serial")
@district_opt
@click.option("--node", "is_node", is_flag=True)
@click.option("--operator", "operator_id", default=None)
@dir_opt
def serial(district: str, is_node: bool, operator_id: str | None, root: Path) -> None:
    """Print the serial of the certificate a node or operator holds now (for scripts)."""
    ident = _identity(district, is_node, operator_id)
    try:
        cert = certops.current_certificate(_paths(root, district), ident)
    except CertOpsError as exc:
        fail(str(exc))
    click.echo(f"{cert.serial_number:x}")


@certs.command("renew-due")
@district_opt
@dir_opt
def renew_due(district: str, root: Path) -> None:
    """Renew certificates past half their lifetime, lapsing CRLs and an aged bundle (a timer)."""
    try:
        done = certops.renew_due(_paths(root, district), datetime.now(UTC))
    except CertOpsError as exc:
        fail(str(exc))
    for path in done.certificates:
        click.echo(f"renewed {path}")
    for ca in done.crls:
        click.echo(f"re-signed the revocation list of CA {ca}")
    if done.bundle is not None:
        click.echo(f"bundle {Bundle.parse(done.bundle.document).sequence} published")
    click.echo(f"{len(done.certificates)} certificate(s) renewed")


@certs.command("rotate-ca")
@district_opt
@click.option(
    "--stage",
    required=True,
    type=click.Choice([s.value for s in RotationStage]),
    help="publish, then (after peers have the bundle) activate, then retire.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="The node's node.toml: activate and retire go on only once every peer in it "
    "has fetched the current bundle.",
)
@click.option("--force", is_flag=True, help="Go on although a peer has not fetched it.")
@dir_opt
def rotate_ca(district: str, stage: str, config_path: Path | None, force: bool, root: Path) -> None:
    """Rotate the district CA in three stages, with old and new trusted while they overlap.

    A peer that misses the publish stage's bundle cannot set up a channel to
    this district after activate, and never recovers by itself: activate and
    retire check first that every peer has fetched the current bundle.
    """
    paths = _paths(root, district)
    if RotationStage(stage) is not RotationStage.PUBLISH and not force:
        _require_peers_caught_up(paths, config_path)
    try:
        click.echo(certops.rotate_ca(paths, RotationStage(stage), datetime.now(UTC)))
    except CertOpsError as exc:
        fail(str(exc))


def _require_peers_caught_up(paths: DistrictPaths, config_path: Path | None) -> None:
    if config_path is None:
        fail(
            "activate and retire check that every peer has fetched the current bundle: "
            "pass --config node.toml (or --force)"
        )
    try:
        cfg = load_config(config_path, os.environ)
        behind = certops.peers_behind(
            cfg.trust.bundle_file or paths.bundle, [p.district for p in cfg.peers]
        )
    except (ConfigError, CertOpsError, BundleRefused) as exc:
        fail(str(exc))
    if behind:
        listed = ", ".join(f"{d} (has {n if n else 'none'})" for d, n, _ in behind)
        fail(
            f"not every peer has fetched bundle {behind[0][2]}: {listed}. Wait for their "
            "refresh (`broker trust status`), ask them to fetch, or --force"
        )


@certs.command("revoke")
@district_opt
@click.option("--serial", "serial_hex", required=True, help="Serial in hex, as status prints it.")
@click.option(
    "--force",
    is_flag=True,
    help="Revoke a node serial even while a node epoch move is pending.",
)
@dir_opt
def revoke(district: str, serial_hex: str, force: bool, root: Path) -> None:
    """Revoke a certificate: its serial joins the revocation list of the CA that issued it."""
    try:
        done = certops.revoke(_paths(root, district), serial_hex, datetime.now(UTC), force=force)
    except CertOpsError as exc:
        fail(str(exc))
    click.echo(f"serial {serial_hex} revoked in the list of CA {done.issuer}")


@certs.command("status")
@district_opt
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--all",
    "all_issued",
    is_flag=True,
    help="Also every certificate replaced since, from the issuance log (revoked or not).",
)
@dir_opt
def status(district: str, as_json: bool, all_issued: bool, root: Path) -> None:
    """Every CA and certificate with its time left; exits 1 if any is expired or under 1/3 left.

    Only certificates held now count for the exit status.
    """
    try:
        rows = certops.status(_paths(root, district), datetime.now(UTC), all_issued)
    except CertOpsError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        plain_console(width=160).print(_table(rows))
    if any(r.failing for r in rows):
        sys.exit(1)


def _table(rows: list[certops.CertStatus]) -> Table:
    """Subjects and serials whole (``revoke --serial`` takes them as printed); warnings wrap."""
    table = Table()
    table.add_column("kind")
    whole = {
        "subject": [r.subject for r in rows],
        "serial": [r.serial for r in rows],
        "not after": [r.not_after[:16] for r in rows],
    }
    for col, values in whole.items():
        table.add_column(col, no_wrap=True, min_width=max(map(len, values), default=len(col)))
    table.add_column("left")
    table.add_column("warning")
    for r in rows:
        kind = f"{r.kind} (signing)" if r.active else r.kind
        kind = kind if r.current else f"{kind} (replaced)"
        left = f"{r.seconds_left / 86400:.1f} d ({r.fraction_left:.0%})"
        table.add_row(kind, r.subject, r.serial, r.not_after[:16], left, r.warning)
    return table
