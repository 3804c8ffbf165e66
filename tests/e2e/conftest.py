"""Fixtures of the end-to-end tests only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import previous_release


@pytest.fixture(scope="session")
def previous_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's ``broker`` package, extracted once per session."""
    return previous_release.extract(tmp_path_factory.mktemp("previous-release"))
