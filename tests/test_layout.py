"""The tree is the architecture: small modules, a test file for each, few top-level modules."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROKER = ROOT / "broker"
MAX_LINES = 500
MAX_TOP_LEVEL_MODULES = 6


def _hand_written_modules() -> list[Path]:
    return sorted(p for p in BROKER.rglob("*.py") if "_proto" not in p.relative_to(BROKER).parts)


def test_the_tree_is_found() -> None:
    """Guards the tests below against passing on an empty walk."""
    assert len(_hand_written_modules()) > 40


def test_no_module_is_over_500_lines() -> None:
    """A module over 500 lines does more than one job; generated code aside."""
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _hand_written_modules()
    }
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


def test_every_module_has_its_own_test_file() -> None:
    """broker/<package>/<module>.py is tested in tests/<package>/test_<module>.py."""
    missing = []
    for p in _hand_written_modules():
        rel = p.relative_to(BROKER)
        if rel.name == "__init__.py" or len(rel.parts) == 1:
            continue  # package markers, and the entry point (__main__) beside them
        expected = ROOT / "tests" / rel.parent / f"test_{rel.name}"
        if not expected.is_file():
            missing.append(str(expected.relative_to(ROOT)))
    assert missing == []


def test_broker_has_at_most_six_top_level_modules() -> None:
    """Code lives in a package named for its concern, not beside them."""
    top = sorted(p.name for p in BROKER.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
