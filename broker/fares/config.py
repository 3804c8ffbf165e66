"""Where this district's fare rules live: ``[fares]``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FaresConfig:
    """``[fares]``.

    Attributes:
        file: this district's fare rules (TOML, ``broker/fares/rules.py``);
            ``None``: decisions carry no price and trips cannot be priced.
    """

    file: Path | None = None
