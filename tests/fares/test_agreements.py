"""Agreements between districts: the claim per trip line, in integer fen."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.core.errors import ConfigError
from broker.fares.agreements import Agreement, parse_agreements
from broker.node.config import load_config, render_config


def test_claim_is_collected_charge_plus_the_reimbursed_share_of_the_concession():
    a = Agreement("512021", True, {"senior-bus-free": 10_000, "scenic-senior": 5_000})
    assert a.claim_fen(0, 200, "senior-bus-free") == 200
    assert a.claim_fen(5750, 5750, "scenic-senior") == 5750 + 2875
    assert a.claim_fen(200, 0, None) == 200
    assert a.claim_fen(0, 200, "unlisted-scheme") == 0
    # 3333 bp of 25 fen = 8.3325 → 8; of 45 fen = 14.9985 → 15 (half up, per line).
    b = Agreement("500153", False, {"s": 3_333})
    assert b.claim_fen(999, 25, "s") == 8
    assert b.claim_fen(999, 45, "s") == 15
    assert Agreement("500153", False, {"s": 5_000}).claim_fen(0, 1, "s") == 1  # 0.5 → 1
    with pytest.raises(ValueError):
        a.claim_fen(-1, 0, None)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([{"district": "5121"}], "district"),
        ([{"district": "512021"}, {"district": "512021"}], "two agreements"),
        ([{"district": "512021", "concession_share_bp": {"x": 10_001}}], "0-10000"),
        ([{"district": "512021", "concession_share_bp": {"x": 1.5}}], "0-10000"),
        ([{"district": "512021", "collect_through_home": "yes"}], "true or false"),
        ([{"district": "512021", "offline_risk": "nobody"}], "offline_risk"),
        ([{"district": "512021", "offline_risk": True}], "offline_risk"),
    ],
)
def test_bad_agreements_are_refused_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_agreements(raw)


def test_agreements_round_trip_through_the_node_config(districts, tmp_path: Path):
    from dataclasses import replace

    cfg = replace(
        districts["500111"].config,
        agreements=(
            Agreement("512021", True, {"senior-bus-free": 10_000}),
            Agreement("500153", False, {}, offline_risk="home"),
        ),
    )
    path = tmp_path / "again.toml"
    path.write_text(render_config(cfg))
    again = load_config(path, env={})
    assert again.agreements == cfg.agreements
    assert again.agreement("512021") == cfg.agreements[0]
    assert again.agreement("500118") is None


def test_the_offline_risk_is_the_operators_unless_the_agreement_says_the_home():
    assert parse_agreements([{"district": "512021"}])[0].offline_risk == "operator"
    (home,) = parse_agreements([{"district": "512021", "offline_risk": "home"}])
    assert home.offline_risk == "home"
    with pytest.raises(ValueError, match="offline_risk"):
        Agreement("512021", offline_risk="anyone")
