"""broker/testbed/build.py: local multi-district setups, synthetic card-holders, free ports."""

from __future__ import annotations

import os
import random
import re
import socket
import stat
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from broker.cards.csv_import import COLUMNS, STATUSES, parse_import
from broker.cards.gb11643 import parse_ssn
from broker.cards.model import shanghai_day
from broker.cards.privacy import load_key_file
from broker.cards.registry import Registry
from broker.fares.rules import load_fares
from broker.node.config import load_config, render_config
from broker.peers.bundles import held_bundle
from broker.testbed.build import (
    OPERATOR_ID,
    SAMPLE_AGREEMENT,
    DistrictSetup,
    build,
    free_port,
    make_ssn,
    synthetic_cards,
    write_import_file,
)
from broker.trust.certops import read_bundle
from broker.trust.config import node_server_name
from broker.trust.identity import node_identity, operator_identity
from broker.trust.tls import spiffe_ids
from tests.helpers import registry_file

DAZU, ANYUE = "500111", "512021"
CARDS = 25


@pytest.fixture
def two(tmp_path: Path, now: datetime) -> dict[str, DistrictSetup]:
    return build(tmp_path / "bed", (DAZU, ANYUE), now, cards_per_district=CARDS)


def test_each_config_loads_back_equal_to_the_setup(two: dict[str, DistrictSetup]):
    for s in two.values():
        assert load_config(s.config_path, env={}) == s.config
        assert render_config(s.config) == s.config_path.read_text()  # a stable round trip


def test_districts_listen_on_distinct_ports_and_peer_with_each_other(
    two: dict[str, DistrictSetup],
):
    assert two[DAZU].config.listen != two[ANYUE].config.listen
    for code, other in ((DAZU, ANYUE), (ANYUE, DAZU)):
        cfg = two[code].config
        assert [p.district for p in cfg.peers] == [other]
        peer = cfg.peer(other)
        assert peer is not None
        assert peer.address == two[other].config.listen
        assert peer.server_name == node_server_name(other)
        agreement = cfg.agreement(other)
        assert agreement is not None
        assert agreement.collect_through_home == SAMPLE_AGREEMENT["collect_through_home"]
        assert cfg.ledger.path is not None and cfg.ledger.url is None
        assert cfg.settlement.key_file is not None and cfg.settlement.key_file.exists()


def test_each_district_prices_by_its_own_fare_file(two: dict[str, DistrictSetup]):
    for code, s in two.items():
        assert s.config.fares.file is not None
        assert load_fares(s.config.fares.file).district == code


def test_each_registry_holds_exactly_its_synthetic_cards(two: dict[str, DistrictSetup]):
    for code, s in two.items():
        assert len(s.cards) == CARDS
        assert {c.ref.issuer_region for c in s.cards} == {code}
        reg = Registry(s.config.registry)
        try:
            assert reg.count() == CARDS
            for card in s.cards:
                row = reg.lookup(card.ref.card_number)
                assert row is not None
                assert (row.status, row.valid_until, row.birth_date) == (
                    card.status,
                    card.valid_until,
                    card.birth_date,
                )
                assert (row.disabled, row.student) == (card.disabled, card.student)
        finally:
            reg.close()


def test_each_peers_bundle_is_held_as_that_peer_published_it(two: dict[str, DistrictSetup]):
    for code, other in ((DAZU, ANYUE), (ANYUE, DAZU)):
        peer = two[code].config.peer(other)
        assert peer is not None and peer.bundle_file is not None
        held = held_bundle(peer)
        assert held is not None and held.district == other and held.sequence == 1
        published = read_bundle(two[other].paths.bundle)
        assert published is not None
        assert read_bundle(peer.bundle_file) == published
        own_cas = x509.load_pem_x509_certificates(two[other].paths.ca_cert.read_bytes())
        assert held.cas() == own_cas


def test_node_and_operator_certificates_carry_their_identities(two: dict[str, DistrictSetup]):
    for code, s in two.items():
        assert s.operator_id == OPERATOR_ID
        node = x509.load_pem_x509_certificate(s.paths.node_cert.read_bytes())
        op = x509.load_pem_x509_certificate(s.operator_cert.read_bytes())
        assert spiffe_ids(node) == [node_identity(code).spiffe_id]
        assert spiffe_ids(op) == [operator_identity(code, OPERATOR_ID).spiffe_id]
        assert s.operator_key.exists()


def test_the_same_seed_builds_the_same_cards(tmp_path: Path, now: datetime):
    a = build(tmp_path / "a", (DAZU,), now, cards_per_district=CARDS, seed=7)
    b = build(tmp_path / "b", (DAZU,), now, cards_per_district=CARDS, seed=7)
    c = build(tmp_path / "c", (DAZU,), now, cards_per_district=CARDS, seed=8)
    assert a[DAZU].cards == b[DAZU].cards
    assert a[DAZU].cards != c[DAZU].cards


def test_peers_of_limits_peering_and_a_ledger_url_replaces_sqlite(tmp_path: Path, now: datetime):
    setups = build(
        tmp_path,
        (DAZU, ANYUE),
        now,
        cards_per_district=1,
        peers_of={DAZU: [ANYUE], ANYUE: []},
        ledger_url="postgresql://nobody@127.0.0.1:1/none",
        ledger_schema_prefix="zz",
    )
    assert [p.district for p in setups[DAZU].config.peers] == [ANYUE]
    assert setups[ANYUE].config.peers == () and setups[ANYUE].config.agreements == ()
    for code, s in setups.items():
        assert s.config.ledger.path is None
        assert s.config.ledger.url == "postgresql://nobody@127.0.0.1:1/none"
        assert s.config.ledger.schema == f"zz_{code}"


def test_synthetic_ssns_are_valid_gb11643_numbers_of_the_district_and_birth_date():
    today = date(2026, 1, 5)
    pairs = synthetic_cards(DAZU, 300, today, random.Random(1))
    for card, row in pairs:
        assert row["ssn"][:6] == DAZU
        assert parse_ssn(row["ssn"], today) == card.birth_date  # also checks MOD 11-2
        assert row["ssn"][6:14] == f"{card.birth_date:%Y%m%d}"


def test_synthetic_cards_are_reproducible_from_the_seed():
    today = date(2026, 1, 5)
    first = synthetic_cards(DAZU, 50, today, random.Random(42))
    again = synthetic_cards(DAZU, 50, today, random.Random(42))
    other = synthetic_cards(DAZU, 50, today, random.Random(43))
    assert first == again
    assert [r["ssn"] for _, r in first] != [r["ssn"] for _, r in other]


def test_synthetic_rows_match_their_cards_and_mix_statuses():
    today = date(2026, 1, 5)
    pairs = synthetic_cards(ANYUE, 300, today, random.Random(3))
    for card, row in pairs:
        assert row["card_number"] == card.ref.card_number
        assert row["status"] == card.status and row["status"] in STATUSES
        assert row["valid_until"] == card.valid_until.isoformat()
        assert row["disabled"] == str(card.disabled).lower()
        assert row["student"] == str(card.student).lower()
        if card.student:
            assert 6 <= today.year - card.birth_date.year <= 22
    # The demo needs cards to refuse as well as cards to admit.
    assert {c.status for c, _ in pairs} == set(STATUSES)
    assert any(c.valid_until < today for c, _ in pairs)


def test_synthetic_card_numbers_count_up_from_start_and_are_valid():
    pairs = synthetic_cards(DAZU, 3, date(2026, 1, 5), random.Random(0), start=9_999_998)
    numbers = [c.ref.card_number for c, _ in pairs]
    assert numbers == [f"C{DAZU}9999998", f"C{DAZU}9999999", f"C{DAZU}10000000"]
    assert all(re.fullmatch(r"[0-9A-Z]{6,20}", n) for n in numbers)


def test_nobody_is_born_after_today_even_early_in_the_range():
    """Birth dates are drawn up to 2017; with an earlier 'today' they must still be past."""
    today = date(1960, 6, 1)
    pairs = synthetic_cards(DAZU, 200, today, random.Random(5))
    assert all(card.birth_date <= today for card, _ in pairs)
    for card, row in pairs:
        assert parse_ssn(row["ssn"], today) == card.birth_date


def test_make_ssn_check_character_accepts_x():
    """Over many birth dates some check characters are X; every number still validates."""
    rng = random.Random(11)
    ssns = [make_ssn(DAZU, date(1950, 1, 1) + timedelta(days=i), rng) for i in range(0, 3000, 7)]
    assert any(s.endswith("X") for s in ssns)
    for s in ssns:
        parse_ssn(s, date(2026, 1, 1))


def test_write_import_file_round_trips_through_the_import_parser(tmp_path: Path, now: datetime):
    today = shanghai_day(now)
    pairs = synthetic_cards(DAZU, 10, today, random.Random(2))
    path = tmp_path / "deep" / "dir" / "cards.csv"  # parent directories are created
    write_import_file(path, [row for _, row in pairs])
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    setups = build(tmp_path / "bed", (DAZU,), now, cards_per_district=1)
    hasher = load_key_file(setups[DAZU].paths.hash_key)
    with path.open() as fh:
        rows = parse_import(fh, today, hasher)
    assert [r.card_number for r in rows] == [c.ref.card_number for c, _ in pairs]
    assert [r.birth_date for r in rows] == [c.birth_date for c, _ in pairs]


def test_the_import_file_holds_id_numbers_so_it_is_private_whatever_the_umask(tmp_path: Path):
    rows = [row for _, row in synthetic_cards(DAZU, 2, date(2026, 1, 1), random.Random(2))]
    path = tmp_path / "deep" / "cards.csv"
    saved = os.umask(0)
    try:
        write_import_file(path, rows)
        path.chmod(0o644)  # rewritten: truncated in place, mode made private again
        write_import_file(path, rows)
    finally:
        os.umask(saved)
    assert (stat.S_IMODE(path.stat().st_mode), stat.S_IMODE(path.parent.stat().st_mode)) == (
        0o600,
        0o700,
    )
    assert len(path.read_text().splitlines()) == 3


def test_each_districts_var_directory_is_private_whatever_the_umask(tmp_path: Path, now: datetime):
    saved = os.umask(0)
    try:
        setups = build(tmp_path / "bed", (DAZU, ANYUE), now, cards_per_district=2)
    finally:
        os.umask(saved)
    var = tmp_path / "bed" / "var"
    for d in (var, *(var / code for code in setups)):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for s in setups.values():
        assert stat.S_IMODE(registry_file(s.config).stat().st_mode) == 0o600


def test_free_port_never_hands_out_the_same_port_twice():
    """Each port is free when handed out, and none is handed out again while whoever got it
    may not have bound it yet (two districts of one build once got the same one)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_free_port_returns_a_loopback_port_that_can_be_bound():
    port = free_port()
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    # below the ports outgoing connections get: none of them can take it first
    assert 10_000 <= port < first_ephemeral
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
