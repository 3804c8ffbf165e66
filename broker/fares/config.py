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
        changeover_grace_s: for how long after a new fare table takes effect a
            trip priced by the previous one is still accepted — at intake and
            by the home district verifying it (the gate prices by its own clock).
    """

    file: Path | None = None
    changeover_grace_s: int = 600
