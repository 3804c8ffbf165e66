"""``broker trust``: the first exchange of trust bundles between districts.

Fingerprints are printed with ``click.echo``, one to a line, exactly as
``openssl x509 -fingerprint -sha256`` prints them: operators read them out by
phone (see :mod:`broker.cli.output` for what Rich would do to them).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.cli.output import fail
from broker.core.errors import ConfigError
from broker.node.config import load_config
from broker.peers.bundles import accept, held_bundle
from broker.trust.bundle import Bundle, BundleRefused, SignedBundle, read_served, verify
from broker.trust.certops import DistrictPaths, read_bundle


def fingerprint(pem: str) -> str:
    """SHA-256 fingerprint of a certificate, as `openssl x509 -fingerprint -sha256` prints it."""
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _print_fingerprint(pem: str, err: bool = True) -> None:
    click.echo(f"CA fingerprint (SHA-256): {fingerprint(pem)}", err=err)


@click.group()
def trust() -> None:
    """Trust bundles: export ours, check and import a neighbour's first one (later are fetched)."""


@trust.command("export")
@click.option("--district", required=True)
@click.option(
    "--dir", "root", default=Path("certs"), show_default=True, type=click.Path(path_type=Path)
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: stdout.")
def export(district: str, root: Path, out: Path | None) -> None:
    """Write the district's signed trust bundle, to hand to a neighbour."""
    signed = read_bundle(DistrictPaths(root, district).bundle)
    if signed is None:
        fail(f"district {district} has no bundle under {root}: run `broker certs init-ca`")
    bundle = Bundle.parse(signed.document)
    if out is None:
        click.echo(signed.to_json().decode())
    else:
        out.write_bytes(signed.to_json())
    for pem in bundle.cas_pem:
        _print_fingerprint(pem)


@trust.command("fingerprint")
@click.argument("bundle_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def fingerprint_cmd(bundle_file: Path) -> None:
    """Show whose bundle a file holds and its CAs' fingerprints, to compare before importing.

    Needs no config and changes nothing; refuses a file that is not a bundle
    signed by one of its own CAs (what ``import --first-use`` requires).
    """
    try:
        signed = SignedBundle.from_json(bundle_file.read_bytes())
        bundle = verify(signed, Bundle.parse(signed.document).district, None, 0)
    except BundleRefused as exc:
        fail(f"{bundle_file}: {exc}")
    click.echo(f"bundle {bundle.sequence} of district {bundle.district}, issued {bundle.issued_at}")
    for pem in bundle.cas_pem:
        _print_fingerprint(pem, err=False)


@trust.command("import")
@click.argument("bundle_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.option(
    "--first-use",
    is_flag=True,
    help="Trust a neighbour's first bundle by itself (after checking its fingerprint).",
)
@click.option(
    "--replace",
    is_flag=True,
    help="With --first-use: replace a held bundle whose CAs no longer sign the neighbour's "
    "(it rotated its CA while this node missed the publish stage).",
)
def import_(bundle_file: Path, config_path: Path, first_use: bool, replace: bool) -> None:
    """Store a neighbour's bundle for the peer of the same district in node.toml."""
    try:
        cfg = load_config(config_path, os.environ)
        signed = SignedBundle.from_json(bundle_file.read_bytes())
        bundle = Bundle.parse(signed.document)
    except (ConfigError, BundleRefused) as exc:
        fail(str(exc))
    peer = cfg.peer(bundle.district)
    if peer is None:
        fail(f"district {bundle.district} is not a peer in {config_path}")
    if held_bundle(peer) is None and not first_use:
        for pem in bundle.cas_pem:
            _print_fingerprint(pem)
        fail(
            "no bundle held for this district yet: compare the fingerprint above (also "
            "`broker trust fingerprint FILE`) with the neighbour's by another channel, "
            "then repeat with --first-use"
        )
    if replace and not first_use:
        fail("--replace needs --first-use: compare the fingerprint out of band first")
    if replace:
        for pem in bundle.cas_pem:
            _print_fingerprint(pem)
    try:
        stored = accept(peer, signed, first_use=first_use, replace=replace)
    except BundleRefused as exc:
        fail(str(exc))
    if stored is None:
        click.echo(f"bundle {bundle.sequence} of {bundle.district} is already held")
    else:
        click.echo(
            f"bundle {stored.sequence} of {stored.district} stored in {peer.bundle_file}; "
            "running nodes pick it up within a second"
        )


@trust.command("status")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
def status(config_path: Path) -> None:
    """Each peer: the bundle held from it, and which of our bundles it last fetched."""
    try:
        cfg = load_config(config_path, os.environ)
        ours = read_bundle(cfg.trust.bundle_file) if cfg.trust.bundle_file else None
        served = read_served(cfg.trust.bundle_file) if cfg.trust.bundle_file else {}
    except (ConfigError, BundleRefused) as exc:
        fail(str(exc))
    current = Bundle.parse(ours.document).sequence if ours is not None else None
    click.echo(f"our bundle: sequence {current if current is not None else '-'}")
    for peer in cfg.peers:
        try:
            held = held_bundle(peer)
        except (BundleRefused, OSError) as exc:
            held, problem = None, f"unreadable: {exc}"
        else:
            problem = "" if held is not None else "none held"
        theirs = (
            f"held {held.sequence} issued {held.issued_at} pins {held.node_name or '-'}"
            if held is not None
            else problem
        )
        seen = served.get(peer.district)
        fetched = f"fetched our {seen[0]} at {seen[1]}" if seen else "never fetched ours"
        late = current is not None and (seen is None or seen[0] < current)
        behind = " (BEHIND)" if late else ""
        click.echo(f"{peer.district}: {theirs}; {fetched}{behind}")
