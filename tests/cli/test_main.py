"""The ``broker`` command, through click's runner: certificates, import, demo."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import structlog
from click.testing import CliRunner
from cryptography import x509

from broker.cards.gb11643 import ssn_check_character
from broker.cards.registry import Registry
from broker.cli.main import accept_log_options_after_commands, log_choice, log_options, main
from broker.node import logs
from broker.node.config import load_config
from broker.trust.tls import spiffe_ids


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each command configures logging for the runner's stderr; later tests get theirs back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def ssn(born: str = "19500101") -> str:
    first = f"500111{born}321"
    return first + ssn_check_character(first)


def setup_district(tmp_path: Path) -> Path:
    runner = CliRunner()
    certs = tmp_path / "certs"
    for args in (
        ["certs", "init-ca", "--district", "500111", "--dir", str(certs)],
        ["certs", "issue", "--district", "500111", "--node", "--dir", str(certs)],
        [
            "certs",
            "issue",
            "--district",
            "500111",
            "--operator",
            "bus-01",
            "--days",
            "7",
            "--dir",
            str(certs),
        ],
    ):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    config = tmp_path / "node.toml"
    config.write_text(
        'district = "500111"\nlisten = "127.0.0.1:0"\n'
        '[tls]\nca_file = "certs/500111/ca.pem"\ncert_file = "certs/500111/node.pem"\n'
        'key_file = "certs/500111/node.key"\n'
        'crl_file = "certs/500111/crl.pem"\n'
        '[registry]\npath = "var/registry.sqlite3"\n'
        '[privacy]\nhash_key_file = "certs/500111/hash.key"\n'
    )
    return config


def test_certs_commands_write_keys_0600_and_spiffe_identities(tmp_path: Path):
    setup_district(tmp_path)
    d = tmp_path / "certs" / "500111"
    (ca_key,) = (d / "cas").glob("*.key")
    for key in (ca_key, d / "node.key", d / "operators" / "bus-01.key", d / "hash.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    node = x509.load_pem_x509_certificate((d / "node.pem").read_bytes())
    op = x509.load_pem_x509_certificate((d / "operators" / "bus-01.pem").read_bytes())
    assert spiffe_ids(node) == ["spiffe://500111.yikatong.cy/node"]
    assert spiffe_ids(op) == ["spiffe://500111.yikatong.cy/operator/bus-01"]
    assert (op.not_valid_after_utc - op.not_valid_before_utc).days == 7


def test_init_ca_refuses_to_overwrite_and_issue_needs_one_kind(tmp_path: Path):
    setup_district(tmp_path)
    runner = CliRunner()
    again = runner.invoke(
        main, ["certs", "init-ca", "--district", "500111", "--dir", str(tmp_path / "certs")]
    )
    assert again.exit_code == 1 and "already has a CA" in again.output
    both = runner.invoke(
        main,
        [
            "certs",
            "issue",
            "--district",
            "500111",
            "--node",
            "--operator",
            "x",
            "--dir",
            str(tmp_path / "certs"),
        ],
    )
    assert both.exit_code == 1 and "exactly one" in both.output
    bad_id = runner.invoke(
        main,
        [
            "certs",
            "issue",
            "--district",
            "500111",
            "--operator",
            "Bad_ID",
            "--dir",
            str(tmp_path / "certs"),
        ],
    )
    assert bad_id.exit_code == 1 and "operator id" in bad_id.output


def test_registry_import_good_file_then_bad_file_changes_nothing(tmp_path: Path):
    config = setup_district(tmp_path)
    header = "card_number,ssn,status,disabled,student,valid_until\n"
    good = tmp_path / "good.csv"
    good.write_text(
        header + f"A00000001,{ssn()},active,false,false,2030-01-01\n"
        f"A00000002,{ssn('19900101')},active,true,false,2030-01-01\n"
    )
    runner = CliRunner()
    result = runner.invoke(main, ["registry", "import", str(good), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "2 new" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text(
        header + f"A00000001,{ssn()},lost,false,false,2030-01-01\n"
        f"A00000003,{ssn()[:-1]}Z,active,false,false,2030-01-01\n"
        f"A00000004,{ssn()},active,false,false,someday\n"
    )
    result = runner.invoke(main, ["registry", "import", str(bad), "--config", str(config)])
    assert result.exit_code == 1
    assert "line 3:" in result.output and "line 4:" in result.output
    assert "line 2:" not in result.output
    assert ssn() not in result.output
    reg = Registry(load_config(config, env={}).registry)
    try:
        card = reg.lookup("A00000001")
        assert card is not None and card.status == "active"  # the bad file changed nothing
        assert reg.count() == 2
    finally:
        reg.close()


def test_demo_json_runs_three_districts_and_agrees_with_the_registries():
    result = CliRunner().invoke(main, ["demo", "--checks", "400", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["checks"] == 400 and summary["mismatches"] == 0
    pairs = {(p["gate_district"], p["home_district"]): p for p in summary["pairs"]}
    gates = {"500111", "512021", "500153"}
    assert {g for g, _ in pairs} == gates
    for (gate, home), p in pairs.items():
        if gate == home:
            assert set(p["sources"]) == {"HOME"}
        elif home in gates:
            assert set(p["sources"]) <= {"PEER", "CACHE"} and p["sources"].get("PEER", 0) >= 1
        else:
            assert set(p["sources"]) == {"OFFLINE_POLICY"} and p["allowed"] == 0
    assert any(p["sources"].get("CACHE", 0) > 0 for p in pairs.values())
    for p in pairs.values():  # refused checks are never priced; allowed ones by the sample rules
        assert p["charged_fen"] >= 0 and p["concession_fen"] >= 0
        if p["allowed"] == 0:
            assert p["charged_fen"] == p["concession_fen"] == 0
    assert sum(p["charged_fen"] + p["concession_fen"] for p in pairs.values()) > 0


def test_python_m_broker_serve_answers_health_and_stops_on_sigterm(tmp_path: Path, now):
    import signal
    import subprocess
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from broker.testbed import build as testbed
    from broker.trust.config import node_server_name

    setups = testbed.build(tmp_path, ("500111",), now, cards_per_district=5)
    s = setups["500111"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", str(s.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    creds = grpc.ssl_channel_credentials(
        s.paths.ca_cert.read_bytes(), s.operator_key.read_bytes(), s.operator_cert.read_bytes()
    )
    target = s.config.listen
    opts = [("grpc.ssl_target_name_override", node_server_name("500111"))]
    try:
        with grpc.secure_channel(target, creds, options=opts) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 20
            while True:
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    break
                except grpc.RpcError:
                    assert proc.poll() is None, "node exited before it became healthy"
                    assert time.monotonic() < deadline, "node never became healthy"
                    time.sleep(0.1)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert b"node_stopped" in err
        assert f"district 500111 serving on {target}".encode() in err  # console: plain text
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_serve_refuses_a_port_it_cannot_bind(tmp_path: Path, now):
    import socket

    from broker.testbed import build as testbed

    setups = testbed.build(tmp_path, ("500111",), now, cards_per_district=1)
    cfg = setups["500111"].config_path
    host, port = load_config(cfg, env={}).listen.rsplit(":", 1)
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        result = CliRunner().invoke(main, ["serve", "--config", str(cfg)])
    assert result.exit_code == 1
    assert "cannot listen" in result.output


def test_log_options_after_serve_make_its_failure_a_json_event(tmp_path: Path):
    missing = tmp_path / "node.toml"
    result = CliRunner().invoke(
        main, ["serve", "--config", str(missing), "--log-json", "--log-level", "debug"]
    )
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"]) == ("serve_failed", "error")
    assert str(missing) in event["error"] and "does not exist" in event["error"]


def test_every_command_takes_the_log_options_after_its_name():
    def walk(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}")

    for path, cmd in walk(main, "broker"):
        names = [p.name for p in cmd.params]
        assert names.count("log_level") == names.count("log_json") == 1, path
    result = CliRunner().invoke(main, ["certs", "issue", "--help"])
    assert "--log-json" in result.output and "--log-level" in result.output


def chatty_group() -> click.Group:
    """A stand-in for ``broker``: a group, a nested group, commands that log at each level."""

    def speak() -> None:
        log = structlog.get_logger("broker.test")
        log.debug("d")
        log.info("i")
        log.warning("w")

    @click.group(params=log_options(show_default=True))
    def top() -> None:
        logs.configure(log_choice().level, log_choice().json)

    @top.group()
    def nested() -> None:
        pass

    top.command("leaf")(speak)
    nested.command("leaf")(speak)
    accept_log_options_after_commands(top)
    return top


@pytest.mark.parametrize(
    ("args", "events"),
    [
        (["leaf"], ["i", "w"]),
        (["leaf", "--log-level", "debug"], ["d", "i", "w"]),
        (["--log-level", "error", "leaf", "--log-level", "debug"], ["d", "i", "w"]),
        (["--log-level", "debug", "leaf", "--log-json"], ["d", "i", "w"]),
        (["--log-json", "nested", "leaf", "--log-level", "warning"], ["w"]),
        (["nested", "--log-level", "warning", "leaf", "--log-json"], ["w"]),
    ],
)
def test_log_options_are_taken_before_or_after_a_command_and_the_later_wins(
    args: list[str], events: list[str]
):
    """``--log-level debug`` after the command works; a default never undoes a choice."""
    result = CliRunner().invoke(chatty_group(), [*args])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    if "--log-json" in args:
        assert [json.loads(line)["event"] for line in lines] == events
    else:
        assert [line.split("] ", 1)[1].split()[0] for line in lines] == events


SPY_ON_GRPC_IMPORT = """
import os, sys

seen = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_VERBOSITY"))
        return None

sys.meta_path.insert(0, Spy())
sys.argv = ["broker", "--version"]
try:
    {enter}
except SystemExit:
    pass
import grpc  # if the entry did not import it, this is its first import
print("GRPC_VERBOSITY at the first import of grpc:", seen[0])
"""

ENTRIES = {
    "python -m broker": 'import runpy; runpy.run_module("broker", run_name="__main__")',
    "broker (console script)": "from broker.cli.main import main; main()",
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(("given", "seen"), [(None, "NONE"), ("INFO", "INFO")])
def test_grpc_core_is_quieted_before_grpc_is_first_imported(
    entry: str, given: str | None, seen: str
):
    """gRPC core reads GRPC_VERBOSITY once, at import: both entries set it first, unless the
    operator did (see broker/node/logs.py)."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    if given is not None:
        env["GRPC_VERBOSITY"] = given
    code = SPY_ON_GRPC_IMPORT.format(enter=ENTRIES[entry])
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert f"GRPC_VERBOSITY at the first import of grpc: {seen}" in done.stdout


def test_demo_json_as_a_process_prints_nothing_but_json_on_stdout():
    """The node's worker processes (intake, verification) log to stderr like the node:
    what a script reads from ``broker demo --json`` parses whole."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "demo", "--checks", "200", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["checks"] == 200 and summary["mismatches"] == 0
