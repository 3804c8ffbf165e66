"""The shipped district reference table: loading, parsing of quoted fields, display names."""

from __future__ import annotations

import dataclasses
from importlib import resources

import pytest

from broker.cards.districts import District, district_names, load_districts
from broker.cards.model import validate_region

DAZU, ANYUE, RONGCHANG = "500111", "512021", "500153"


def test_the_table_is_not_empty_and_starts_with_dazu_the_home_district():
    rows = load_districts()
    assert len(rows) >= 3
    assert rows[0].code == DAZU
    assert rows[0].relation_to_dazu == "home"
    assert [r.code for r in rows if r.relation_to_dazu == "home"] == [DAZU]


def test_every_row_is_a_district_with_a_valid_unique_code_and_names():
    rows = load_districts()
    assert all(isinstance(r, District) for r in rows)
    codes = [r.code for r in rows]
    assert len(codes) == len(set(codes))
    for r in rows:
        assert validate_region(r.code) == r.code  # 6 digits, first 1-8
        assert r.name_zh and r.name_en and r.province
        assert isinstance(r.historical_codes, str)


def test_one_row_per_data_line_of_the_shipped_file():
    """Quoted fields with commas inside (historical codes) do not split or merge rows."""
    text = resources.files("broker").joinpath("data/districts.csv").read_text(encoding="utf-8")
    data_lines = [line for line in text.splitlines()[1:] if line.strip()]
    assert len(load_districts()) == len(data_lines)


def test_quoted_historical_codes_keep_their_commas_and_semicolons():
    by_code = {d.code: d for d in load_districts()}
    neijiang = by_code["511000"]
    assert "511002" in neijiang.historical_codes
    assert "511083" in neijiang.historical_codes  # after several commas inside the quotes
    assert neijiang.name_en == "Neijiang City"  # the columns did not shift
    assert "500225" in by_code[DAZU].historical_codes
    assert "510230" in by_code[DAZU].historical_codes  # after a semicolon


def test_an_empty_historical_codes_cell_is_the_empty_string():
    without = [d for d in load_districts() if not d.historical_codes]
    assert without, "the shipped table has rows without historical codes"
    assert all(d.historical_codes == "" for d in without)


def test_chinese_names_are_read_as_utf8():
    by_code = {d.code: d for d in load_districts()}
    assert by_code[DAZU].name_zh == "大足区"
    assert by_code[ANYUE].name_zh == "安岳县"
    assert by_code[RONGCHANG].name_zh == "荣昌区"


def test_the_testbed_districts_are_in_the_table():
    codes = {d.code for d in load_districts()}
    assert {DAZU, ANYUE, RONGCHANG} <= codes


def test_districts_are_immutable_values():
    d = load_districts()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.code = "999999"  # type: ignore[misc]
    assert load_districts()[0] == d  # loaded afresh, equal by value


def test_district_names_map_every_code_to_its_english_name():
    rows = load_districts()
    names = district_names()
    assert names == {d.code: d.name_en for d in rows}
    assert names[DAZU] == "Dazu District"
    assert names[ANYUE] == "Anyue County"


def test_changing_the_returned_names_does_not_change_the_next_answer():
    names = district_names()
    names[DAZU] = "Somewhere Else"
    del names[ANYUE]
    again = district_names()
    assert again[DAZU] == "Dazu District"
    assert ANYUE in again
