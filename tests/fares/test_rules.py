"""Fare rules as data: the most specific rule, the best concession, integer fen."""

from __future__ import annotations

import tomllib
from datetime import date

import pytest

from broker.cards.model import Entitlement, Scene
from broker.core.errors import ConfigError
from broker.fares.rules import parse_fares, round_half_up_div

E = Entitlement
RULES = """
district = "500111"

[[table]]
version = "2026.01"
effective_from = "2026-01-01"
[[table.rule]]
scene = "bus"
gross_fare_fen = 150

[[table]]
version = "2026.11"
effective_from = "2026-11-01"
[[table.scheme]]
name = "senior-bus-free"
per_month = 60
per_year = 1200
[[table.rule]]
scene = "bus"
gross_fare_fen = 200
concessions = [
  { entitlement = "senior_65", kind = "free", scheme = "senior-bus-free" },
  { entitlement = "senior_60", kind = "percent", value_bp = 5000, scheme = "senior-half" },
  { entitlement = "student", kind = "fixed", value_fen = 50, scheme = "student" },
  { entitlement = "disabled", kind = "percent", value_bp = 3333, scheme = "disabled" },
]
[[table.rule]]
scene = "bus"
place = "route-205"
gross_fare_fen = 300
[[table.rule]]
operator = "rock-carvings"
scene = "scenic_area"
place = "baodingshan"
gross_fare_fen = 11500
concessions = [
  { entitlement = "senior_60", kind = "percent", value_bp = 5000, scheme = "scenic-senior" },
  { entitlement = "senior_70", kind = "free", scheme = "scenic-senior" },
  { entitlement = "student", kind = "fixed", value_fen = 20000, scheme = "scenic-student" },
]
"""


@pytest.fixture
def schedule():
    return parse_fares(tomllib.loads(RULES))


def test_the_table_in_force_on_the_day_applies(schedule):
    assert schedule.table_on(date(2025, 12, 31)) is None
    assert schedule.table_on(date(2026, 10, 31)).version == "2026.01"
    assert schedule.table_on(date(2026, 11, 1)).version == "2026.11"
    assert schedule.version("2026.01").effective_from == date(2026, 1, 1)


def test_the_largest_applicable_concession_wins_and_amounts_add_up(schedule):
    t = schedule.table_on(date(2026, 11, 28))
    senior = t.price("bus-01", Scene.BUS, "route-1", [E.SENIOR_60, E.SENIOR_65])
    assert (senior.gross_fare_fen, senior.charged_fen, senior.concession_fen) == (200, 0, 200)
    assert senior.applied_entitlement is E.SENIOR_65 and senior.scheme == "senior-bus-free"
    half = t.price("bus-01", Scene.BUS, "route-1", [E.SENIOR_60, E.STUDENT])
    assert (half.charged_fen, half.applied_entitlement) == (100, E.SENIOR_60)
    nobody = t.price("bus-01", Scene.BUS, "route-1", [])
    assert (nobody.charged_fen, nobody.concession_fen, nobody.applied_entitlement) == (200, 0, None)
    # 33.33 % of 200 fen = 66.66 fen, rounded half up to 67.
    disabled = t.price("bus-01", Scene.BUS, "route-1", [E.DISABLED])
    assert disabled.concession_fen == 67 and disabled.charged_fen == 133
    for p in (senior, half, nobody, disabled):
        assert p.charged_fen + p.concession_fen == p.gross_fare_fen
        assert p.version == "2026.11"


def test_the_most_specific_rule_wins(schedule):
    t = schedule.table_on(date(2026, 11, 28))
    assert t.price("bus-01", Scene.BUS, "route-205", []).gross_fare_fen == 300
    rock = t.price("rock-carvings", Scene.SCENIC_AREA, "baodingshan", [E.STUDENT])
    assert (rock.gross_fare_fen, rock.concession_fen, rock.charged_fen) == (11500, 11500, 0)
    assert t.price("other-op", Scene.SCENIC_AREA, "baodingshan", []).gross_fare_fen == 0
    assert t.price("x", Scene.LIBRARY, "central", [E.SENIOR_70]).gross_fare_fen == 0


def test_round_half_up_on_integer_fen():
    assert [round_half_up_div(n, 2) for n in (0, 1, 2, 3, 5)] == [0, 1, 1, 2, 3]
    assert round_half_up_div(6666, 100) == 67 and round_half_up_div(6649, 100) == 66


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            RULES.replace(
                'scene = "bus"\ngross_fare_fen = 150', 'scene = "tram"\ngross_fare_fen = 150'
            ),
            "scene must be one of",
        ),
        (RULES.replace("gross_fare_fen = 150", "gross_fare_fen = -1"), "gross_fare_fen"),
        (RULES.replace("gross_fare_fen = 150", "gross_fare_fen = 1.5"), "gross_fare_fen"),
        (
            RULES.replace(
                'value_bp = 5000, scheme = "senior-half"', 'value_bp = 12000, scheme = "x"'
            ),
            "value_bp",
        ),
        (RULES.replace('kind = "free", scheme = "senior-bus-free"', 'kind = "free"'), "scheme"),
        (RULES.replace('"senior_65"', '"veteran"'), "entitlement must be one of"),
        (RULES.replace('version = "2026.11"', 'version = "2026.01"'), "version appears twice"),
        (RULES.replace('effective_from = "2026-11-01"', 'effective_from = "soon"'), "ISO date"),
    ],
)
def test_bad_rules_are_refused_naming_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_fares(tomllib.loads(bad))
