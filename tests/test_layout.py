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


# ---------------------------------------------------------------- one place per mechanism


def _uses(path: Path) -> set[str]:
    """Dotted names a module calls or reads (``sqlite3.connect``, ``x.st_mtime``) and imports."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            base = node.value.id if isinstance(node.value, ast.Name) else "*"
            found.add(f"{base}.{node.attr}")
            found.add(f"*.{node.attr}")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
            found.add(node.module)
        elif isinstance(node, ast.keyword) and node.arg:
            found.add(f"keyword {node.arg}")
    return found


# The one module for each: where connections are made, documents encoded, files stat'ed.
ONE_PLACE = {
    "sqlite3.connect": "core/db.py",
    "psycopg.connect": "core/db.py",
    "rfc8785": "core/signing.py",
    "*.st_mtime_ns": "core/watch.py",
}
# JSON that is not a signed document: what the CLI prints, the certificate issuance log.
PLAIN_JSON = {"cli/main.py", "cli/settle.py", "cli/certs.py", "trust/certops.py"}


def _modules_using(name: str) -> set[str]:
    return {str(p.relative_to(BROKER)) for p in _hand_written_modules() if name in _uses(p)}


def test_connections_encodings_and_file_stamps_each_have_one_module():
    for name, module in ONE_PLACE.items():
        assert _modules_using(name) == {module}, name  # found there, and nowhere else
    assert _modules_using("*.st_mtime") == set()  # seconds, as a float: not even there


def test_json_is_read_and_written_only_by_the_signing_module_and_plain_outputs():
    for name in ("json.dumps", "json.loads", "json.dump", "json.load", "json.JSONEncoder"):
        assert _modules_using(name) <= PLAIN_JSON | {"core/signing.py"}, name
    assert "core/signing.py" in _modules_using("json.loads")  # the strict parser
    assert _modules_using("keyword sort_keys") == set()  # no hand-made canonical encoder left


def test_no_module_waits_with_asyncio_wait_for():
    """On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that comes in the turn its
    awaitable finishes: a loop built on it never stops (a node's stop hung on one). Modules
    use ``asyncio.timeout`` instead."""
    assert _modules_using("asyncio.wait_for") == set()
