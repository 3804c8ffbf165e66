"""Agreements between districts: what a home district owes for its card-holders' trips elsewhere.

Per pair (this district, the card's home district): whether charged fares
are collected through the home district (then it owes them), and the share of
each concession scheme it reimburses, in basis points. The amount claimed for
one trip line is computed per line, in integer fen::

    claimed = (charged if collected through home else 0)
              + round_half_up(concession × share_bp / 10000)

A trip the gate allowed by its offline policy (nothing usable cached, the home
district not reachable: the card was not verified) carries no concession, so
its claim is the standard fare when fares are collected through home, else 0.
Who bears the risk that such a card was not valid is ``offline_risk``:
``"operator"`` (the default: the home pays only for a card that was ACTIVE,
as it had recorded, when the trip occurred) or ``"home"`` (the home pays for
any card it issued, as an EMV issuer bears the first ride).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.cards.model import validate_region
from broker.core.errors import ConfigError, InvalidArgument
from broker.fares.rules import round_half_up_div

OFFLINE_RISKS = ("operator", "home")


@dataclass(frozen=True)
class Agreement:
    """This district's agreement with one home district.

    Attributes:
        district: the home district (whose card-holders travel here).
        collect_through_home: charged fares are collected by the home district,
            which then owes them to this district's operators.
        concession_share_bp: per concession scheme, the share of the concession
            the home district reimburses (0-10000 basis points; absent: 0).
        offline_risk: who bears an offline trip's unverified card (see above):
            ``"operator"`` or ``"home"``.
    """

    district: str
    collect_through_home: bool = False
    concession_share_bp: Mapping[str, int] = field(default_factory=dict)
    offline_risk: str = "operator"

    def __post_init__(self) -> None:
        if self.offline_risk not in OFFLINE_RISKS:
            raise ValueError(f"offline_risk must be one of {', '.join(OFFLINE_RISKS)}")

    def claim_fen(self, charged_fen: int, concession_fen: int, scheme: str | None) -> int:
        """The amount claimed from the home district for one trip line."""
        if charged_fen < 0 or concession_fen < 0:
            raise ValueError("amounts are never negative")
        share = self.concession_share_bp.get(scheme, 0) if scheme else 0
        collected = charged_fen if self.collect_through_home else 0
        return collected + round_half_up_div(concession_fen * share, 10_000)


def parse_agreements(raw: Any) -> tuple[Agreement, ...]:
    """Read the ``[[agreements]]`` array of a node config."""
    if not isinstance(raw, list):
        raise ConfigError("[[agreements]] must be an array of tables")
    out: list[Agreement] = []
    for i, a in enumerate(raw):
        where = f"agreements[{i}]"
        try:
            district = validate_region(str(a.get("district", "")), f"{where}.district")
        except InvalidArgument as exc:
            raise ConfigError(str(exc)) from exc
        if any(x.district == district for x in out):
            raise ConfigError(f"{where}.district {district} has two agreements")
        shares = a.get("concession_share_bp", {})
        if not isinstance(shares, Mapping):
            raise ConfigError(f"{where}.concession_share_bp must be a table of scheme = bp")
        for scheme, bp in shares.items():
            if not isinstance(bp, int) or isinstance(bp, bool) or not 0 <= bp <= 10_000:
                raise ConfigError(f"{where}.concession_share_bp.{scheme} must be 0-10000")
        collect = a.get("collect_through_home", False)
        if not isinstance(collect, bool):
            raise ConfigError(f"{where}.collect_through_home must be true or false")
        risk = a.get("offline_risk", "operator")
        if risk not in OFFLINE_RISKS:
            raise ConfigError(f"{where}.offline_risk must be one of {', '.join(OFFLINE_RISKS)}")
        out.append(Agreement(district, collect, dict(shares), risk))
    return tuple(out)
