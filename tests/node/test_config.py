"""Node configuration: TOML in, frozen dataclasses out, env overrides, clear errors."""

from __future__ import annotations

import dataclasses
import re
import textwrap
import tomllib
import typing
from dataclasses import replace
from pathlib import Path

import pytest

from broker.core.errors import ConfigError
from broker.gate.config import SCENE_NAMES
from broker.node import config as config_module
from broker.node.config import BOUNDS, NodeConfig, load_config, parse_config, render_config
from tests.runbook import file_block

MINIMAL = """
district = "500111"
listen = "127.0.0.1:0"
[tls]
ca_file = "c/ca.pem"
cert_file = "c/node.pem"
key_file = "c/node.key"
crl_file = "c/crl.pem"
[registry]
path = "var/r.sqlite3"
[privacy]
hash_key_file = "c/hash.key"
[[peers]]
district = "512021"
address = "127.0.0.1:5000"
ca_file = "/abs/anyue-ca.pem"
crl_file = "/abs/anyue-crl.pem"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_relative_paths_resolve_against_the_config_and_defaults_apply(tmp_path: Path):
    cfg = load_config(write(tmp_path, MINIMAL), env={})
    assert cfg.tls.ca_file == tmp_path / "c" / "ca.pem"
    assert cfg.peers[0].ca_file == Path("/abs/anyue-ca.pem")
    assert cfg.peers[0].server_name == "node.512021.yikatong.cy"
    assert cfg.cache.redis_url is None
    assert cfg.recognition.cache_ttl_seconds == 120
    assert cfg.peer("512021") is cfg.peers[0]
    assert cfg.peer("500153") is None


def test_render_then_load_round_trips(tmp_path: Path):
    cfg = load_config(write(tmp_path, MINIMAL), env={})
    again = load_config(write(tmp_path, render_config(cfg)), env={})
    assert again == cfg


def test_env_overrides(tmp_path: Path):
    env = {
        "YIKATONG_REDIS_URL": "redis://127.0.0.1:1/0",
        "YIKATONG_LISTEN": "0.0.0.0:9",
        "YIKATONG_PEER_DEADLINE_MS": "150",
    }
    cfg = load_config(write(tmp_path, MINIMAL), env=env)
    assert cfg.cache.redis_url == "redis://127.0.0.1:1/0"
    assert cfg.listen == "0.0.0.0:9"
    assert cfg.peering.deadline_ms == 150


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace('district = "500111"', 'district = "5001"'), "district"),
        (lambda s: s.replace('listen = "127.0.0.1:0"\n', ""), "listen is required"),
        (lambda s: s.replace('key_file = "c/node.key"\n', ""), "tls.key_file is required"),
        (lambda s: s.replace('"512021"', '"500111"'), "own district"),
        (lambda s: s + "[cache]\nlocal_max_entries = -1\n", "cache.local_max_entries"),
        (lambda s: s + '[[peers]]\ndistrict = "512021"\naddress="x"\nca_file="y"\n', "twice"),
        (lambda s: s.replace("[tls]", "[tls"), "node.toml"),
    ],
)
def test_bad_configs_are_refused_with_the_offending_key(tmp_path: Path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, edit(MINIMAL)), env={})


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def _documented_example() -> str:
    """The node.toml in ``broker/node/config.py``'s docstring: the one place keys are documented."""
    doc = config_module.__doc__ or ""
    block = doc.split("A node.toml looks like::\n", 1)[1].split("\nRelative paths", 1)[0]
    block = block.split("\n\nEvery key", 1)[0]
    return textwrap.dedent(block)


def _documented_keys(example: str) -> set[str]:
    """``section.key`` for every key in the example, commented-out alternatives included."""
    keys, section = set(), ""
    for line in example.splitlines():
        if m := re.match(r"\s*\[\[?([a-z_]+)\]?\]", line):
            section = m.group(1)
        elif m := re.match(r"\s*(?:#\s*)?([a-z_]+)\s*=", line):
            keys.add(f"{section}.{m.group(1)}" if section else m.group(1))
    return keys


def _loader_keys() -> set[str]:
    """Every key the loader reads: the fields of NodeConfig's section dataclasses."""
    keys = {"district", "listen"}
    for f in dataclasses.fields(NodeConfig):
        if f.name in ("district", "listen", "access"):  # [access] keys are method names
            continue
        if f.name == "offline":  # [offline] keys are the scenes
            keys |= {f"offline.{scene}" for scene in SCENE_NAMES}
            continue
        hint = typing.get_type_hints(NodeConfig)[f.name]
        section = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint
        keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(section)}
    return keys


def test_every_key_the_node_reads_is_documented_in_the_example_and_nothing_else_is():
    example = _documented_example()
    assert _documented_keys(example) == _loader_keys()


def test_the_documented_example_is_a_config_the_loader_accepts():
    cfg = parse_config(tomllib.loads(_documented_example()), Path("/etc/yikatong"), env={})
    assert cfg.district == "500111"
    assert cfg.ledger.path == Path("/etc/yikatong/var/500111/ledger.sqlite3")
    assert cfg.cache.redis_timeout_ms == 50
    assert cfg.agreement("512021") is not None


OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_the_runbooks_node_toml_has_every_section_and_every_documented_key():
    """The complete node.toml of docs/operations.md's first setup: what a new operator copies.

    It must document the keys the example above documents (so a key added to one
    and not the other fails here), set every section the loader reads, and load;
    tests/e2e/test_runbook.py then serves a node with it.
    """
    runbook = file_block(OPERATIONS, "node.toml")
    assert _documented_keys(runbook) == _documented_keys(_documented_example())
    doc = tomllib.loads(runbook)
    sections = {f.name for f in dataclasses.fields(NodeConfig)} - {"district", "listen"}
    assert sections == {
        "tls", "privacy", "registry", "fares", "ledger", "settlement", "trust",
        "peers", "peering", "recognition", "agreements", "cache", "offline", "access",
    }  # fmt: skip
    assert set(doc) == {"district", "listen"} | sections
    cfg = parse_config(doc, Path("/srv/yikatong"), env={})
    assert cfg.tls.crl_file == Path("/srv/yikatong/certs/500111/crl.pem")
    assert cfg.settlement.key_file == Path("/srv/yikatong/certs/500111/settlement.key")
    peer = cfg.peer("512021")
    assert peer is not None and peer.bundle_file is not None
    assert cfg.agreement("512021") is not None and cfg.ledger.path is not None


def _declared_overrides(cls: type) -> set[str]:
    names = set()
    for f in dataclasses.fields(cls):
        if "env" in f.metadata:
            names.add(f.metadata["env"])
        hint = typing.get_type_hints(cls)[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            names |= _declared_overrides(hint)
    return names


def test_env_overrides_are_declared_on_their_fields_and_documented():
    declared = _declared_overrides(NodeConfig)
    documented = set(re.findall(r"YIKATONG_[A-Z_]+", config_module.__doc__ or ""))
    assert (
        declared
        == documented
        == {
            "YIKATONG_LISTEN",
            "YIKATONG_REDIS_URL",
            "YIKATONG_REGISTRY_PATH",
            "YIKATONG_REGISTRY_URL",
            "YIKATONG_PEER_DEADLINE_MS",
            "YIKATONG_LEDGER_URL",
            "YIKATONG_INTAKE_LISTEN",
        }
    )


def test_path_and_url_overrides_apply_and_an_empty_value_clears_an_optional_one(tmp_path: Path):
    text = MINIMAL + '[ledger]\nurl = "postgresql://db/x"\n[cache]\nredis_url = "redis://r/1"\n'
    env = {
        "YIKATONG_REGISTRY_PATH": "/srv/registry.sqlite3",
        "YIKATONG_LEDGER_URL": "",
        "YIKATONG_REDIS_URL": "",
    }
    cfg = load_config(write(tmp_path, text), env=env)
    assert cfg.registry.path == Path("/srv/registry.sqlite3")
    assert cfg.ledger.url is None
    assert cfg.cache.redis_url is None
    untouched = load_config(write(tmp_path, text), env={})
    assert untouched.ledger.url == "postgresql://db/x"
    assert untouched.cache.redis_url == "redis://r/1"


def test_a_deadline_override_that_is_no_integer_is_refused_by_name(tmp_path: Path):
    with pytest.raises(ConfigError, match="YIKATONG_PEER_DEADLINE_MS must be an integer"):
        load_config(write(tmp_path, MINIMAL), env={"YIKATONG_PEER_DEADLINE_MS": "fast"})


def test_a_full_config_renders_as_toml_that_loads_back_equal(tmp_path: Path):
    """Every section set, a PostgreSQL ledger too: tomli-w's text reads back as the same config."""
    full = parse_config(tomllib.loads(_documented_example()), tmp_path, env={})
    full = replace(full, ledger=replace(full.ledger, url="postgresql://db/ledger", schema="yk_dz"))
    text = render_config(full)
    assert tomllib.loads(text)["ledger"]["schema"] == "yk_dz"
    assert load_config(write(tmp_path, text), env={}) == full


def test_unset_optional_sections_are_left_out_of_the_rendered_toml(tmp_path: Path):
    text = render_config(load_config(write(tmp_path, MINIMAL), env={}))
    doc = tomllib.loads(text)
    assert "ledger" not in doc and "settlement" not in doc and "fares" not in doc


def with_key(dotted: str, value: str) -> str:
    """MINIMAL with ``section.key = value`` set (the section added when MINIMAL has none)."""
    section, key = dotted.split(".")
    if f"[{section}]\n" in MINIMAL:
        return MINIMAL.replace(f"[{section}]\n", f"[{section}]\n{key} = {value}\n")
    return MINIMAL + f"[{section}]\n{key} = {value}\n"


INTERVALS = [
    "tls.max_connection_age_s",
    "tls.reload_interval_ms",
    "trust.bundle_refresh_s",
    "peering.deadline_ms",
    "cache.redis_timeout_ms",
]


@pytest.mark.parametrize("key", INTERVALS)
def test_a_zero_interval_is_refused_naming_the_key(tmp_path: Path, key: str):
    """A zero reload interval would spin the event loop; a zero deadline refuse every peer."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be from 1 to \d+, not 0$"):
        load_config(write(tmp_path, with_key(key, "0")), env={})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tls.reload_interval_ms", "3600001"),
        ("tls.max_connection_age_s", "86401"),
        ("trust.bundle_refresh_s", "86401"),
        ("peering.deadline_ms", "60001"),
        ("cache.redis_timeout_ms", "60001"),
        ("cache.local_max_entries", "10000001"),
        ("cache.max_ttl_seconds", "86401"),
        ("recognition.cache_ttl_seconds", "-1"),
        ("recognition.unknown_ttl_seconds", "86401"),
        ("cache.unknown_ttl_seconds", "-1"),
    ],
)
def test_a_value_outside_its_range_is_refused_naming_the_key(tmp_path: Path, key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be from -?\d+ to \d+"):
        load_config(write(tmp_path, with_key(key, value)), env={})


@pytest.mark.parametrize("value", ["1.5", "true", '"300"'])
def test_an_integer_key_refuses_other_types_naming_the_key(tmp_path: Path, value: str):
    with pytest.raises(ConfigError, match=r"^peering\.deadline_ms must be an integer from 1 to"):
        load_config(write(tmp_path, with_key("peering.deadline_ms", value)), env={})


@pytest.mark.parametrize(
    "key",
    [
        "cache.local_max_entries",  # no in-process tier
        "cache.unknown_ttl_seconds",  # UNKNOWN answers are not cached
        "cache.max_ttl_seconds",
        "recognition.cache_ttl_seconds",  # peers are told not to cache
        "recognition.unknown_ttl_seconds",
    ],
)
def test_zero_is_kept_where_it_means_do_not_cache(tmp_path: Path, key: str):
    cfg = load_config(write(tmp_path, with_key(key, "0")), env={})
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == 0


def test_each_documented_integer_key_takes_both_ends_of_its_range(tmp_path: Path):
    documented = _documented_keys(_documented_example())
    for (section_cls, name), bound in BOUNDS.items():
        section = next(
            f.name
            for f in dataclasses.fields(NodeConfig)
            if typing.get_type_hints(NodeConfig)[f.name] is section_cls
        )
        if f"{section}.{name}" not in documented:
            continue  # not read from node.toml (yet): test_every_key_the_node_reads_... says so
        for value in (bound.low, bound.high):
            cfg = load_config(write(tmp_path, with_key(f"{section}.{name}", str(value))), env={})
            assert getattr(getattr(cfg, section), name) == value


def _int_fields(cls: type) -> set[tuple[type, str]]:
    hints = typing.get_type_hints(cls)
    return {(cls, f.name) for f in dataclasses.fields(cls) if hints[f.name] is int}


def test_every_integer_key_of_node_toml_has_a_range_and_every_range_a_key():
    sections = set()
    for f in dataclasses.fields(NodeConfig):
        hint = typing.get_type_hints(NodeConfig)[f.name]
        section = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint
        if isinstance(section, type) and dataclasses.is_dataclass(section):
            sections.add(section)
    assert set().union(*(_int_fields(cls) for cls in sections)) == set(BOUNDS)


@pytest.mark.parametrize("raw", ["0", "-1", "60001", "99999999999999999999"])
def test_a_deadline_override_out_of_range_is_refused_naming_the_variable(tmp_path: Path, raw):
    with pytest.raises(
        ConfigError, match=rf"^YIKATONG_PEER_DEADLINE_MS must be from 1 to 60000, not {raw}$"
    ):
        load_config(write(tmp_path, MINIMAL), env={"YIKATONG_PEER_DEADLINE_MS": raw})


def test_a_deadline_override_at_the_ends_of_its_range_is_taken(tmp_path: Path):
    for raw in ("1", "60000"):
        cfg = load_config(write(tmp_path, MINIMAL), env={"YIKATONG_PEER_DEADLINE_MS": raw})
        assert cfg.peering.deadline_ms == int(raw)


def test_an_override_is_checked_even_when_the_file_is_fine(tmp_path: Path):
    """The variable replaces a valid value: the bound is applied to what the node will use."""
    text = with_key("peering.deadline_ms", "300")
    with pytest.raises(ConfigError, match="YIKATONG_PEER_DEADLINE_MS"):
        load_config(write(tmp_path, text), env={"YIKATONG_PEER_DEADLINE_MS": "0"})


def test_the_duplicate_window_is_5_seconds_unless_set_and_0_turns_it_off(tmp_path: Path):
    assert load_config(write(tmp_path, MINIMAL), env={}).settlement.duplicate_window_s == 5
    off = load_config(write(tmp_path, with_key("settlement.duplicate_window_s", "0")), env={})
    assert off.settlement.duplicate_window_s == 0
    wide = load_config(write(tmp_path, with_key("settlement.duplicate_window_s", "30")), env={})
    assert wide.settlement.duplicate_window_s == 30
    again = load_config(write(tmp_path, render_config(wide)), env={})
    assert again.settlement == wide.settlement  # a window set is rendered, and read back


def test_batch_maxima_default_to_twice_a_10_million_line_day_and_are_read_back(tmp_path: Path):
    cfg = load_config(write(tmp_path, MINIMAL), env={}).settlement
    assert (cfg.max_batch_lines, cfg.max_batch_bytes) == (20_000_000, 4_000_000_000)
    small = load_config(write(tmp_path, with_key("settlement.max_batch_lines", "3")), env={})
    assert small.settlement.max_batch_lines == 3
    again = load_config(write(tmp_path, render_config(small)), env={})
    assert again.settlement == small.settlement


@pytest.mark.parametrize(
    ("key", "value"),
    [("settlement.max_batch_lines", "0"), ("settlement.max_batch_bytes", "1000000000001")],
)
def test_a_batch_maximum_out_of_range_is_refused_naming_the_key(tmp_path: Path, key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be from 1 to \d+"):
        load_config(write(tmp_path, with_key(key, value)), env={})


@pytest.mark.parametrize("value", ["-1", "601"])
def test_a_duplicate_window_out_of_range_is_refused_naming_the_key(tmp_path: Path, value):
    with pytest.raises(ConfigError, match=r"^settlement\.duplicate_window_s must be from 0 to 600"):
        load_config(write(tmp_path, with_key("settlement.duplicate_window_s", value)), env={})


def test_the_intake_port_is_read_and_overridden_and_an_empty_value_turns_it_off(tmp_path: Path):
    text = MINIMAL + '[settlement]\nintake_listen = "0.0.0.0:50112"\n'
    assert load_config(write(tmp_path, text), env={}).settlement.intake_listen == "0.0.0.0:50112"
    moved = load_config(write(tmp_path, text), env={"YIKATONG_INTAKE_LISTEN": "127.0.0.1:7"})
    assert moved.settlement.intake_listen == "127.0.0.1:7"
    off = load_config(write(tmp_path, text), env={"YIKATONG_INTAKE_LISTEN": ""})
    assert off.settlement.intake_listen is None
    assert load_config(write(tmp_path, MINIMAL), env={}).settlement.intake_listen is None


def test_worker_cpus_are_read_back_and_default_to_none(tmp_path: Path):
    assert load_config(write(tmp_path, MINIMAL), env={}).settlement.worker_cpus == ()
    placed = load_config(write(tmp_path, with_key("settlement.worker_cpus", "[3, 1]")), env={})
    assert placed.settlement.worker_cpus == (3, 1)
    again = load_config(write(tmp_path, render_config(placed)), env={})
    assert again.settlement == placed.settlement


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1", r"^settlement\.worker_cpus must be a list of CPU numbers"),
        ("[0, -1]", r"^settlement\.worker_cpus\[1\] must be from 0 to 4095, not -1"),
        ('["1"]', r"^settlement\.worker_cpus\[0\] must be an integer"),
        ("[true]", r"^settlement\.worker_cpus\[0\] must be an integer"),
        ("[2, 2]", r"^settlement\.worker_cpus names a CPU twice"),
    ],
)
def test_a_worker_cpu_list_that_is_not_one_is_refused_naming_the_key(
    tmp_path: Path, value: str, message: str
):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, with_key("settlement.worker_cpus", value)), env={})
