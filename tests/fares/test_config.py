"""broker/fares/config.py: [fares], where the district's fare rules are read from."""

from __future__ import annotations

import tomllib
from pathlib import Path

from broker.fares.config import FaresConfig
from broker.node.config import parse_config

BASE = """
district = "500111"
listen = "127.0.0.1:0"
[tls]
ca_file = "ca.pem"
cert_file = "node.pem"
key_file = "node.key"
crl_file = "crl.pem"
[registry]
path = "r.sqlite3"
[privacy]
hash_key_file = "hash.key"
"""


def test_without_a_fares_section_no_rules_are_configured():
    cfg = parse_config(tomllib.loads(BASE), Path("/etc/yk"), env={})
    assert cfg.fares == FaresConfig(file=None)


def test_the_fares_file_is_resolved_against_the_config_directory():
    doc = tomllib.loads(BASE + '[fares]\nfile = "rules/fares.toml"\n')
    assert parse_config(doc, Path("/etc/yk"), env={}).fares.file == Path("/etc/yk/rules/fares.toml")


def test_an_empty_file_name_means_no_rules():
    doc = tomllib.loads(BASE + '[fares]\nfile = ""\n')
    assert parse_config(doc, Path("/etc/yk"), env={}).fares.file is None
