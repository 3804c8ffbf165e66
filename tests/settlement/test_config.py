"""SettlementSettings (broker.settlement.config): the view of a loaded NodeConfig settlement takes.

Settlement code is typed against the protocol, never against the node's config;
a loaded ``NodeConfig`` must satisfy it (mypy checks the calls below) and give
the ledger and agreement values it was configured with.
"""

from __future__ import annotations

from pathlib import Path

from broker.fares.agreements import Agreement
from broker.node.config import NodeConfig, load_config
from broker.settlement.config import SettlementSettings

CONFIG = """
district = "500111"
listen = "127.0.0.1:0"
[tls]
ca_file = "c/ca.pem"
cert_file = "c/node.pem"
key_file = "c/node.key"
crl_file = "c/crl.pem"
[registry]
path = "var/r.sqlite3"
[privacy]
hash_key_file = "c/hash.key"
[fares]
file = "fares.toml"
[ledger]
path = "var/ledger.sqlite3"
[settlement]
key_file = "c/settlement.key"
[[agreements]]
district = "512021"
collect_through_home = true
concession_share_bp = { senior-bus-free = 10000, scenic-senior = 5000 }
[[agreements]]
district = "500153"
[[peers]]
district = "512021"
address = "127.0.0.1:5000"
ca_file = "/abs/anyue-ca.pem"
crl_file = "/abs/anyue-crl.pem"
"""


def settings_seen(s: SettlementSettings) -> dict[str, object]:
    """What settlement code reads, through the protocol only."""
    return {
        "district": s.district,
        "ledger_path": s.ledger.path,
        "ledger_url": s.ledger.url,
        "ledger_schema": s.ledger.schema,
        "settlement_key_file": s.settlement.key_file,
        "fares_file": s.fares.file,
        "agreements": s.agreements,
        "peers": [p.district for p in s.peers],
    }


def load(tmp_path: Path, text: str = CONFIG, env: dict[str, str] | None = None) -> NodeConfig:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return load_config(path, env=env or {})


def test_a_loaded_node_config_gives_settlement_its_ledger_key_and_fares(tmp_path: Path):
    seen = settings_seen(load(tmp_path))
    assert seen["district"] == "500111"
    assert seen["ledger_path"] == tmp_path / "var" / "ledger.sqlite3"  # relative to the file
    assert seen["ledger_url"] is None
    assert seen["ledger_schema"] == "yikatong"  # the default
    assert seen["settlement_key_file"] == tmp_path / "c" / "settlement.key"
    assert seen["fares_file"] == tmp_path / "fares.toml"
    assert seen["peers"] == ["512021"]


def test_agreements_come_through_the_view(tmp_path: Path):
    s: SettlementSettings = load(tmp_path)
    assert s.agreements == (
        Agreement("512021", True, {"senior-bus-free": 10000, "scenic-senior": 5000}),
        Agreement("500153", False, {}),
    )
    anyue = s.agreement("512021")
    assert anyue is not None and anyue.claim_fen(100, 200, "scenic-senior") == 200
    assert s.agreement("500153") == Agreement("500153")
    assert s.agreement("500118") is None  # no agreement: nothing is claimed from it


def test_a_postgres_ledger_and_its_schema_come_through_the_view(tmp_path: Path):
    text = CONFIG.replace(
        'path = "var/ledger.sqlite3"',
        'url = "postgresql://yk@db.example/ledger"\nschema = "yk_500111"',
    )
    seen = settings_seen(load(tmp_path, text))
    assert seen["ledger_path"] is None
    assert seen["ledger_url"] == "postgresql://yk@db.example/ledger"
    assert seen["ledger_schema"] == "yk_500111"


def test_the_ledger_url_from_the_environment_is_what_settlement_sees(tmp_path: Path):
    seen = settings_seen(load(tmp_path, env={"YIKATONG_LEDGER_URL": "postgresql://env/x"}))
    assert seen["ledger_url"] == "postgresql://env/x"
    assert seen["ledger_path"] == tmp_path / "var" / "ledger.sqlite3"  # kept beside it


def test_a_node_without_ledger_or_settlement_sections_has_none_of_them(tmp_path: Path):
    text = CONFIG.split("[fares]")[0]
    s: SettlementSettings = load(tmp_path, text)
    assert (s.ledger.path, s.ledger.url, s.settlement.key_file, s.fares.file) == (None,) * 4
    assert s.agreements == () and s.agreement("512021") is None
