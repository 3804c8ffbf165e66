"""Import files: accepted whole or refused whole, every bad row reported by line."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from broker.cards.csv_import import parse_import
from broker.cards.gb11643 import ssn_check_character
from broker.cards.privacy import Hasher
from broker.core.errors import ImportRejected

TODAY = date(2026, 11, 28)
HASHER = Hasher(b"k" * 32)
HEADER = "card_number,ssn,status,disabled,student,valid_until"


def ssn(area: str = "500111", born: str = "19500101", seq: str = "123") -> str:
    first = area + born + seq
    return first + ssn_check_character(first)


def test_a_good_file_parses_and_replaces_id_numbers_by_keyed_hashes():
    good = ssn()
    rows = parse_import(
        [
            HEADER,
            f"A00000001,{good},active,false,true,2030-01-01",
            f"A00000002,{ssn(seq='124')},lost,TRUE,false,2027-06-30",
        ],
        TODAY,
        HASHER,
    )
    assert [r.card_number for r in rows] == ["A00000001", "A00000002"]
    assert rows[0].birth_date == date(1950, 1, 1)
    assert rows[0].holder_key == HASHER.holder_key(good) != good
    assert rows[1].disabled and rows[1].status == "lost"
    assert good not in repr(rows[0])


def test_every_bad_row_is_reported_with_its_line_and_nothing_is_returned():
    lines = [
        HEADER,
        f"A00000001,{ssn()},active,false,false,2030-01-01",  # line 2 good
        f"a0001,{ssn()},active,false,false,2030-01-01",  # 3 card number
        f"A00000003,{ssn()[:17]}0,active,false,false,2030-01-01",  # 4 check char (if wrong)
        f"A00000004,{ssn()},stolen,false,false,2030-01-01",  # 5 status
        f"A00000005,{ssn()},active,maybe,false,2030-01-01",  # 6 flag
        f"A00000006,{ssn()},active,false,false,2030-13-01",  # 7 date
        f"A00000001,{ssn()},active,false,false,2030-01-01",  # 8 duplicate
        "A00000007,only,three",  # 9 short row
        f"A00000008,{ssn(born='20990101')},active,false,false,2030-01-01",  # 10 future
    ]
    if ssn()[17] == "0":
        lines[3] = lines[3].replace(ssn()[:17] + "0", ssn()[:17] + "1")
    with pytest.raises(ImportRejected) as info:
        parse_import(lines, TODAY, HASHER)
    got = {e.line: e.reason for e in info.value.errors}
    assert sorted(got) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert "card_number" in got[3]
    assert "check character" in got[4]
    assert "status" in got[5]
    assert "disabled" in got[6]
    assert "valid_until" in got[7]
    assert "line 2" in got[8]
    assert "fields" in got[9]
    assert "future" in got[10]
    for reason in got.values():
        assert ssn() not in reason


def test_a_file_without_the_right_header_is_refused():
    with pytest.raises(ImportRejected) as info:
        parse_import(["card_number,ssn,status", "A00000001,x,active"], TODAY, HASHER)
    assert info.value.errors[0].line == 1
    assert "disabled" in info.value.errors[0].reason


def test_changed_at_and_recorded_at_are_optional_instants_with_an_offset():
    header = HEADER + ",changed_at,recorded_at"
    rows = parse_import(
        [
            header,
            f"A00000001,{ssn()},lost,false,false,2030-01-01,"
            "2026-11-27T09:00:00+08:00,2026-11-27T01:30:00Z",
            f"A00000002,{ssn(seq='124')},active,false,false,2030-01-01,,",
        ],
        TODAY,
        HASHER,
    )
    assert rows[0].changed_at == datetime(2026, 11, 27, 1, 0, tzinfo=UTC)
    assert rows[0].recorded_at == datetime(2026, 11, 27, 1, 30, tzinfo=UTC)
    assert (rows[1].changed_at, rows[1].recorded_at) == (None, None)  # left to the import
    plain = parse_import(
        [HEADER, f"A00000001,{ssn()},active,false,false,2030-01-01"], TODAY, HASHER
    )
    assert (plain[0].changed_at, plain[0].recorded_at) == (None, None)


def test_an_instant_without_an_offset_is_refused_naming_its_row_and_column():
    header = HEADER + ",changed_at,recorded_at"
    lines = [
        header,
        f"A00000001,{ssn()},lost,false,false,2030-01-01,2026-11-27T09:00:00,",  # line 2
        f"A00000002,{ssn()},lost,false,false,2030-01-01,,2026-11-27 09:00",  # line 3
        f"A00000003,{ssn()},lost,false,false,2030-01-01,yesterday,",  # line 4
    ]
    with pytest.raises(ImportRejected) as info:
        parse_import(lines, TODAY, HASHER)
    got = {e.line: e.reason for e in info.value.errors}
    assert sorted(got) == [2, 3, 4]
    assert "changed_at" in got[2] and "offset" in got[2]
    assert "recorded_at" in got[3] and "offset" in got[3]
    assert "changed_at" in got[4] and "ISO 8601" in got[4]
