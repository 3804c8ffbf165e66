"""The broker's error tree: one root, the documented children, and what each error carries."""

from __future__ import annotations

import inspect
import re

import pytest

from broker.core import errors
from broker.core.errors import (
    BrokerError,
    ConfigError,
    Conflict,
    DocumentRefused,
    ImportRejected,
    InvalidArgument,
    PeerUnavailable,
    PermissionDenied,
    RowError,
    SettlementStateError,
    Unauthenticated,
    Unavailable,
)


def _exception_classes() -> dict[str, type[BaseException]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    }


def test_the_module_defines_the_documented_tree_and_nothing_else():
    """The tree in the module docstring lists exactly the errors the module defines."""
    doc = errors.__doc__ or ""
    documented = set(re.findall(r"[├└]── (\w+)", doc))
    defined = set(_exception_classes()) - {"BrokerError"}
    assert documented == defined
    assert len(defined) == 12


def test_every_error_is_a_direct_child_of_broker_error():
    for name, cls in _exception_classes().items():
        if cls is BrokerError:
            continue
        assert cls.__bases__ == (BrokerError,), name


def test_broker_error_is_an_ordinary_exception():
    """Not a BaseException-only class: ``except Exception`` at the edges still catches it."""
    assert issubclass(BrokerError, Exception)
    assert not issubclass(BrokerError, (KeyboardInterrupt, SystemExit))


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("card.card_number", "must be 6-20 characters"),
        PermissionDenied("operator may not settle"),
        Unauthenticated("no client certificate"),
        PeerUnavailable("512021", "deadline exceeded"),
        ConfigError("[ledger] needs a path"),
        ImportRejected([RowError(2, "bad ssn")]),
        DocumentRefused("signature does not verify"),
        Conflict("batch 3 already stored with other content"),
        SettlementStateError("day is not closed"),
        Unavailable("the trip intake process stopped before it answered"),
    ],
)
def test_every_error_is_caught_as_a_broker_error(error: BrokerError):
    with pytest.raises(BrokerError) as info:
        raise error
    assert info.value is error
    assert str(error)  # every error says something


def test_invalid_argument_message_starts_with_the_field_path():
    err = InvalidArgument("trips[3].card.issuer_region", "must be a 6-digit code")
    assert str(err) == "trips[3].card.issuer_region: must be a 6-digit code"
    assert err.field == "trips[3].card.issuer_region"
    assert err.reason == "must be a 6-digit code"
    assert err.args == ("trips[3].card.issuer_region: must be a 6-digit code",)


def test_permission_denied_keeps_its_reason_as_the_message():
    err = PermissionDenied("caller is not district 500111")
    assert err.reason == "caller is not district 500111"
    assert str(err) == err.reason


def test_peer_unavailable_names_the_district():
    err = PeerUnavailable("512021", "deadline exceeded")
    assert err.district == "512021"
    assert err.reason == "deadline exceeded"
    assert str(err) == "district 512021: deadline exceeded"


def test_import_rejected_carries_every_row_error_in_order():
    rows = [RowError(2, "ssn check character is wrong"), RowError(7, "card number malformed")]
    err = ImportRejected(rows)
    assert err.errors == rows
    assert [e.line for e in err.errors] == [2, 7]
    assert str(err) == "2 bad row(s); nothing imported"


def test_import_rejected_message_gives_the_count_not_the_rows():
    """The summary line stays short; row reasons are read from ``errors``."""
    rows = [RowError(n, f"reason {n}") for n in range(1, 501)]
    err = ImportRejected(rows)
    assert str(err).startswith("500 bad row(s)")
    assert "reason 1" not in str(err)
    assert len(err.errors) == 500


def test_row_error_prints_its_line_and_reason_and_is_a_frozen_value():
    row = RowError(12, "birth date is in the future")
    assert str(row) == "line 12: birth date is in the future"
    assert row == RowError(12, "birth date is in the future")
    assert row != RowError(13, "birth date is in the future")
    with pytest.raises(AttributeError):
        row.line = 3  # type: ignore[misc]


@pytest.mark.parametrize("cls", [InvalidArgument, PeerUnavailable])
def test_two_part_errors_need_both_parts(cls: type[BrokerError]):
    with pytest.raises(TypeError):
        cls("only one part")
