"""``broker trust``: the first exchange of trust bundles between districts."""

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
from broker.trust.bundle import Bundle, BundleRefused, SignedBundle
from broker.trust.certops import DistrictPaths, read_bundle


def fingerprint(pem: str) -> str:
    """SHA-256 fingerprint of a certificate, as `openssl x509 -fingerprint -sha256` prints it."""
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _print_fingerprint(pem: str) -> None:
    # Plain text on one line: operators read it out to compare, so no markup, emoji or wrapping.
    click.echo(f"CA fingerprint (SHA-256): {fingerprint(pem)}", err=True)


@click.group()
def trust() -> None:
    """Trust bundles: export ours, import a neighbour's first one (later ones are fetched)."""


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


@trust.command("import")
@click.argument("bundle_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.option(
    "--first-use",
    is_flag=True,
    help="Trust a neighbour's first bundle by itself (after checking its fingerprint).",
)
def import_(bundle_file: Path, config_path: Path, first_use: bool) -> None:
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
            "no bundle held for this district yet: compare the fingerprint above with the "
            "neighbour's by another channel, then repeat with --first-use"
        )
    try:
        stored = accept(peer, signed, first_use=first_use)
    except BundleRefused as exc:
        fail(str(exc))
    if stored is None:
        click.echo(f"bundle {bundle.sequence} of {bundle.district} is already held")
    else:
        click.echo(
            f"bundle {stored.sequence} of {stored.district} stored in {peer.bundle_file}; "
            "running nodes pick it up within a second"
        )
