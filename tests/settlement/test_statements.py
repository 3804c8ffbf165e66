"""Statements: per home district, every figure recomputed independently from the raw trips."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from click.testing import CliRunner

from broker.cards.model import CardRef, Entitlement, Scene
from broker.cli.main import main
from broker.fares.agreements import Agreement
from broker.fares.rules import parse_fares
from broker.node.config import load_config, render_config
from broker.settlement.ledger import open_ledger
from broker.settlement.statements import statement
from broker.settlement.trips import judge
from broker.testbed.build import SAMPLE_FARES

FARES = parse_fares(tomllib.loads('district = "500111"\n' + SAMPLE_FARES))
NOW = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)  # 14:00 in Shanghai
SHARES = {"senior-bus-free": 10_000, "scenic-senior": 3_333, "student-bus": 5_000}
AGREEMENTS = {
    "512021": Agreement("512021", True, SHARES),
    "500153": Agreement("500153", False, SHARES),
}
# The scheme each (scene, entitlement) falls under in SAMPLE_FARES, written out by hand.
SCHEME = {
    (Scene.BUS, Entitlement.SENIOR_65): "senior-bus-free",
    (Scene.BUS, Entitlement.STUDENT): "student-bus",
    (Scene.SCENIC_AREA, Entitlement.SENIOR_60): "scenic-senior",
}


def trips():
    from broker.settlement.trips import Trip

    out = []
    cases = [  # (home, scene, entitlement, gross, concession)
        ("512021", Scene.BUS, Entitlement.SENIOR_65, 200, 200),
        ("512021", Scene.BUS, Entitlement.STUDENT, 200, 100),
        ("512021", Scene.SCENIC_AREA, Entitlement.SENIOR_60, 11500, 5750),
        ("512021", Scene.BUS, None, 200, 0),
        ("500153", Scene.SCENIC_AREA, Entitlement.SENIOR_60, 11500, 5750),
        ("500153", Scene.BUS, Entitlement.STUDENT, 200, 100),
        ("500111", Scene.BUS, Entitlement.SENIOR_65, 200, 200),  # a local: nobody to claim from
    ]
    for i, (home, scene, ent, gross, off) in enumerate(cases * 3):
        out.append(
            Trip(
                "transit-01",
                f"t-{i}",
                CardRef(home, f"C{home}{i:07d}"),
                scene,
                "",
                NOW - timedelta(minutes=i),
                gross,
                gross - off,
                off,
                ent,
                "sample-1",
            )
        )
    return out


def expected_claim(t) -> int:
    """The claim recomputed with decimal arithmetic, not the code under test."""
    terms = AGREEMENTS.get(t.card.issuer_region)
    if terms is None:
        return 0
    share = SHARES.get(SCHEME.get((t.scene, t.applied_entitlement), ""), 0)
    part = (Decimal(t.concession_fen) * share / 10_000).quantize(Decimal(1), ROUND_HALF_UP)
    return (t.charged_fen if terms.collect_through_home else 0) + int(part)


def test_every_statement_figure_equals_the_raw_trips_recomputed():
    raw = trips()
    lines = {x.home_district: x for x in statement(raw, "500111", AGREEMENTS.get, FARES)}
    assert set(lines) == {"512021", "500153", "500111"}
    for home, line in lines.items():
        mine = [t for t in raw if t.card.issuer_region == home]
        assert line.trips == len(mine)
        assert line.gross_fen == sum(t.gross_fare_fen for t in mine)
        assert line.charged_fen == sum(t.charged_fen for t in mine)
        assert line.concession_fen == sum(t.concession_fen for t in mine)
        assert line.claimed_fen == sum(expected_claim(t) for t in mine)
    assert lines["500111"].claimed_fen == 0
    # 5750 × 33.33 % = 1916.4975 → 1916 per line, rounded per line before summing.
    assert lines["500153"].claimed_fen == 3 * (1916 + 50)


def test_settle_statement_command_reads_the_ledger(districts, tmp_path):
    s = districts["500111"]
    cfg = replace(s.config, agreements=tuple(AGREEMENTS.values()))
    path = tmp_path / "node.toml"
    path.write_text(render_config(cfg))
    cfg = load_config(path, env={})
    raw = trips()
    ledger = open_ledger(cfg.ledger.path, None)
    known = frozenset({"500111", "512021", "500153"})
    ledger.record([(t, judge(t, NOW, known, FARES)) for t in raw], NOW)
    ledger.close()
    result = CliRunner().invoke(
        main,
        [
            "settle",
            "statement",
            "--config",
            str(path),
            "--period",
            "2026-11-28",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    got = {x["home_district"]: x for x in json.loads(result.stdout)["lines"]}
    want = {x.home_district: x for x in statement(raw, "500111", AGREEMENTS.get, FARES)}
    assert {h: g["claimed_fen"] for h, g in got.items()} == {
        h: w.claimed_fen for h, w in want.items()
    }
    assert sum(g["trips"] for g in got.values()) == len(raw)
    other_day = CliRunner().invoke(
        main,
        [
            "settle",
            "statement",
            "--config",
            str(path),
            "--period",
            "2026-11-27",
            "--format",
            "json",
        ],
    )
    assert json.loads(other_day.output)["lines"] == []
