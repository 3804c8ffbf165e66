"""Reference data: Dazu, its neighbours, their codes and historical codes.

Shipped with the package (``broker/data/districts.csv``, a copy of
``shared/reference/districts.csv``) and seeded into each node's registry.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class District:
    """One row of the reference table."""

    code: str
    name_zh: str
    name_en: str
    province: str
    relation_to_dazu: str
    historical_codes: str


def load_districts() -> tuple[District, ...]:
    """Every district of the shipped reference table, in file order."""
    text = resources.files("broker").joinpath("data/districts.csv").read_text(encoding="utf-8")
    return tuple(
        District(
            code=row["code"],
            name_zh=row["name_zh"],
            name_en=row["name_en"],
            province=row["province"],
            relation_to_dazu=row["relation_to_dazu"],
            historical_codes=row["historical_codes"] or "",
        )
        for row in csv.DictReader(io.StringIO(text))
    )


def district_names() -> dict[str, str]:
    """Code → English name, for display."""
    return {d.code: d.name_en for d in load_districts()}
