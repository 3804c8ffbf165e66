"""Fare rules as data: what a trip costs at the place of travel, and what each entitlement earns.

Same-city treatment (同城待遇): the rules of the district where the card is
used apply to the entitlements its home district recognised. A district's
rules live in a TOML file of dated, versioned tables::

    district = "500111"

    [[table]]
    version = "2026.11"
    effective_from = "2026-11-01"          # a Shanghai calendar day

    [[table.scheme]]                        # caps, counted per card-holder by settlement
    name = "senior-bus-free"
    per_month = 60
    per_year = 1200

    [[table.rule]]
    operator = "*"                          # an operator id, or "*" for any
    scene = "bus"                           # bus | scenic_area | museum | library
    place = "*"                             # a route or site id, or "*" for any
    gross_fare_fen = 200
    concessions = [
      { entitlement = "senior_65", kind = "free", scheme = "senior-bus-free" },
      { entitlement = "senior_60", kind = "percent", value_bp = 5000, scheme = "senior-half" },
      { entitlement = "student", kind = "fixed", value_fen = 50, scheme = "student" },
    ]

The most specific rule wins (an exact operator over ``*``, then an exact place
over ``*``); of the concessions the holder is entitled to, the largest wins.
Money is integer fen throughout; a percentage is rounded half up to the fen.
"""

from __future__ import annotations

import bisect
import enum
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from broker.cards.model import Entitlement, Scene, shanghai_day
from broker.core.errors import ConfigError

MAX_FARE_FEN = 100_000_000  # one million yuan: anything above is a typo, not a fare
# How long after a new table takes effect a trip priced by the previous one is still
# accepted (the gate prices by its own clock): ``[fares] changeover_grace_s``.
CHANGEOVER_GRACE = timedelta(seconds=600)


class ConcessionKind(enum.StrEnum):
    FREE = "free"
    PERCENT = "percent"
    FIXED = "fixed"


def round_half_up_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half up, for non-negative integers."""
    return (2 * numerator + denominator) // (2 * denominator)


@dataclass(frozen=True)
class Concession:
    """What one entitlement earns on one rule.

    Attributes:
        value: basis points of the gross fare for PERCENT, fen off for FIXED.
    """

    entitlement: Entitlement
    kind: ConcessionKind
    value: int
    scheme: str

    def amount(self, gross_fen: int) -> int:
        """The concession in fen on a fare of ``gross_fen`` (never more than the fare)."""
        if self.kind is ConcessionKind.FREE:
            return gross_fen
        if self.kind is ConcessionKind.PERCENT:
            return min(gross_fen, round_half_up_div(gross_fen * self.value, 10_000))
        return min(gross_fen, self.value)


@dataclass(frozen=True)
class FareRule:
    operator: str
    scene: Scene
    place: str
    gross_fare_fen: int
    concessions: tuple[Concession, ...]


@dataclass(frozen=True)
class CapScheme:
    name: str
    per_month: int | None
    per_year: int | None


@dataclass(frozen=True)
class Price:
    """A priced trip. ``charged_fen + concession_fen == gross_fare_fen`` always."""

    gross_fare_fen: int
    charged_fen: int
    concession_fen: int
    applied_entitlement: Entitlement | None
    scheme: str | None
    version: str


NO_FARE = Price(0, 0, 0, None, None, "")


@dataclass(frozen=True)
class FareTable:
    """One version of a district's fare rules, in force from ``effective_from``."""

    version: str
    effective_from: date
    rules: tuple[FareRule, ...]
    schemes: tuple[CapScheme, ...]

    def rule_for(self, operator: str, scene: Scene, place: str) -> FareRule | None:
        """The most specific rule for a trip (exact operator, then exact place, beat ``*``)."""
        best: tuple[int, FareRule] | None = None
        for rule in self.rules:
            if rule.scene is not scene:
                continue
            if rule.operator not in ("*", operator) or rule.place not in ("*", place):
                continue
            rank = (rule.operator != "*") * 2 + (rule.place != "*")
            if best is None or rank > best[0]:
                best = (rank, rule)
        return best[1] if best else None

    def price(
        self, operator: str, scene: Scene, place: str, entitlements: Sequence[Entitlement]
    ) -> Price:
        """Price a trip for a holder with ``entitlements`` (the home district's answer)."""
        rule = self.rule_for(operator, scene, place)
        if rule is None:
            return Price(0, 0, 0, None, None, self.version)
        held = set(entitlements)
        best: Concession | None = None
        for c in rule.concessions:
            if c.entitlement not in held:
                continue
            if best is None or (c.amount(rule.gross_fare_fen), -c.entitlement) > (
                best.amount(rule.gross_fare_fen),
                -best.entitlement,
            ):
                best = c
        off = best.amount(rule.gross_fare_fen) if best else 0
        return Price(
            gross_fare_fen=rule.gross_fare_fen,
            charged_fen=rule.gross_fare_fen - off,
            concession_fen=off,
            applied_entitlement=best.entitlement if best and off else None,
            scheme=best.scheme if best and off else None,
            version=self.version,
        )


@dataclass(frozen=True)
class FareSchedule:
    """A district's fare tables over time; the one in force on a day applies."""

    district: str
    tables: tuple[FareTable, ...]  # sorted by effective_from

    def table_on(self, day: date) -> FareTable | None:
        starts = [t.effective_from for t in self.tables]
        i = bisect.bisect_right(starts, day)
        return self.tables[i - 1] if i else None

    def version(self, version: str) -> FareTable | None:
        return next((t for t in self.tables if t.version == version), None)

    def in_force(self, version: str, at: datetime, grace: timedelta = CHANGEOVER_GRACE) -> bool:
        """Whether ``version`` is the table in force at ``at``, or ``grace`` before it.

        A gate prices by its own clock: just after a new table takes effect
        (midnight, Asia/Shanghai) a gate a little behind still prices by the
        old one, and that is accepted for ``grace``. An older, more generous
        table than that is not.
        """
        now, before = self.table_on(shanghai_day(at)), self.table_on(shanghai_day(at - grace))
        return any(t is not None and t.version == version for t in (now, before))


# ---------------------------------------------------------------- loading

_SCENES = {
    "bus": Scene.BUS,
    "scenic_area": Scene.SCENIC_AREA,
    "museum": Scene.MUSEUM,
    "library": Scene.LIBRARY,
}
_ENTITLEMENTS = {e.name.lower(): e for e in Entitlement}


def _int(value: Any, where: str, low: int = 0, high: int = MAX_FARE_FEN) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{where} must be an integer from {low} to {high}")
    return value


def _concession(raw: Mapping[str, Any], where: str) -> Concession:
    try:
        ent = _ENTITLEMENTS[str(raw["entitlement"])]
    except KeyError:
        raise ConfigError(
            f"{where}.entitlement must be one of {', '.join(_ENTITLEMENTS)}"
        ) from None
    try:
        kind = ConcessionKind(str(raw.get("kind")))
    except ValueError:
        raise ConfigError(f"{where}.kind must be free, percent or fixed") from None
    if kind is ConcessionKind.PERCENT:
        value = _int(raw.get("value_bp"), f"{where}.value_bp", 0, 10_000)
    elif kind is ConcessionKind.FIXED:
        value = _int(raw.get("value_fen"), f"{where}.value_fen")
    else:
        value = 0
    scheme = str(raw.get("scheme", ""))
    if not scheme:
        raise ConfigError(f"{where}.scheme is required (caps and reimbursement are per scheme)")
    return Concession(ent, kind, value, scheme)


def _table(raw: Mapping[str, Any], where: str) -> FareTable:
    try:
        start = date.fromisoformat(str(raw["effective_from"]))
    except (KeyError, ValueError):
        raise ConfigError(f"{where}.effective_from must be an ISO date") from None
    version = str(raw.get("version", ""))
    if not version:
        raise ConfigError(f"{where}.version is required")
    schemes = tuple(
        CapScheme(
            name=str(s.get("name", "")),
            per_month=_int(s["per_month"], f"{where}.scheme[{i}].per_month", 1, 10_000)
            if "per_month" in s
            else None,
            per_year=_int(s["per_year"], f"{where}.scheme[{i}].per_year", 1, 100_000)
            if "per_year" in s
            else None,
        )
        for i, s in enumerate(raw.get("scheme", []))
    )
    rules = []
    for i, r in enumerate(raw.get("rule", [])):
        rw = f"{where}.rule[{i}]"
        scene = _SCENES.get(str(r.get("scene")))
        if scene is None:
            raise ConfigError(f"{rw}.scene must be one of {', '.join(_SCENES)}")
        rules.append(
            FareRule(
                operator=str(r.get("operator", "*")),
                scene=scene,
                place=str(r.get("place", "*")),
                gross_fare_fen=_int(r.get("gross_fare_fen"), f"{rw}.gross_fare_fen"),
                concessions=tuple(
                    _concession(c, f"{rw}.concessions[{j}]")
                    for j, c in enumerate(r.get("concessions", []))
                ),
            )
        )
    return FareTable(version, start, tuple(rules), schemes)


def parse_fares(doc: Mapping[str, Any], where: str = "fares") -> FareSchedule:
    tables = [_table(t, f"{where}.table[{i}]") for i, t in enumerate(doc.get("table", []))]
    tables.sort(key=lambda t: t.effective_from)
    versions = [t.version for t in tables]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"{where}: a table version appears twice")
    starts = [t.effective_from for t in tables]
    if len(set(starts)) != len(starts):
        raise ConfigError(f"{where}: two tables take effect on the same day")
    return FareSchedule(str(doc.get("district", "")), tuple(tables))


def load_fares(path: Path) -> FareSchedule:
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"fare rules {path} do not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"fare rules {path}: {exc}") from exc
    return parse_fares(doc, str(path))


def fares_document(schedule: FareSchedule) -> dict[str, Any]:
    """The schedule as a plain document :func:`parse_fares` reads back (what is published)."""
    scenes = {v: k for k, v in _SCENES.items()}

    def concession(c: Concession) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "entitlement": c.entitlement.name.lower(),
            "kind": c.kind.value,
            "scheme": c.scheme,
        }
        if c.kind is ConcessionKind.PERCENT:
            doc["value_bp"] = c.value
        elif c.kind is ConcessionKind.FIXED:
            doc["value_fen"] = c.value
        return doc

    def scheme(s: CapScheme) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": s.name}
        if s.per_month is not None:
            doc["per_month"] = s.per_month
        if s.per_year is not None:
            doc["per_year"] = s.per_year
        return doc

    return {
        "district": schedule.district,
        "table": [
            {
                "version": t.version,
                "effective_from": t.effective_from.isoformat(),
                "scheme": [scheme(s) for s in t.schemes],
                "rule": [
                    {
                        "operator": r.operator,
                        "scene": scenes[r.scene],
                        "place": r.place,
                        "gross_fare_fen": r.gross_fare_fen,
                        "concessions": [concession(c) for c in r.concessions],
                    }
                    for r in t.rules
                ],
            }
            for t in schedule.tables
        ],
    }


def cap_of(table: FareTable, scheme: str) -> CapScheme | None:
    """The cap a fare table sets on a concession scheme, if any."""
    return next((s for s in table.schemes if s.name == scheme), None)
