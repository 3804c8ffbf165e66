"""Access rights (deny by default) and the guard every registered handler gets."""

from __future__ import annotations

import grpc
import pytest

from broker.core.errors import ConfigError, PermissionDenied
from broker.node.guard import AuthInterceptor, GuardedServer, status_for
from broker.node.metrics import Metrics
from broker.trust.access import AccessPolicy, require_operator
from broker.trust.identity import node_identity, operator_identity
from broker.trust.store import TrustStore
from broker.trust.tls import CallerVerifier

POLICY = AccessPolicy("500111", frozenset({"512021"}))
RECOGNIZE = "/yikatong.v1.Recognition/Recognize"
CHECK = "/yikatong.v1.Gate/Check"


@pytest.mark.parametrize(
    ("method", "ident", "allowed"),
    [
        (RECOGNIZE, node_identity("512021"), True),
        (RECOGNIZE, node_identity("500153"), False),  # not a configured peer
        (RECOGNIZE, operator_identity("500111", "bus-01"), False),
        (CHECK, operator_identity("500111", "bus-01"), True),
        (CHECK, operator_identity("512021", "bus-01"), False),
        (CHECK, node_identity("512021"), False),
        (CHECK, node_identity("500111"), False),
        ("/grpc.health.v1.Health/Check", node_identity("512021"), True),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            operator_identity("500111", "x"),
            True,
        ),
        ("/yikatong.v1.Admin/Everything", node_identity("500111"), False),
        ("/yikatong.v1.Gate", operator_identity("500111", "bus-01"), False),
    ],
)
def test_access_is_denied_unless_a_rule_grants_it(method, ident, allowed):
    if allowed:
        POLICY.authorize(method, ident)
    else:
        with pytest.raises(PermissionDenied):
            POLICY.authorize(method, ident)


def test_an_operator_speaks_only_for_itself():
    require_operator(operator_identity("500111", "bus-01"), "bus-01")
    for ident, claimed in [
        (operator_identity("500111", "bus-01"), "bus-02"),
        (node_identity("500111"), ""),
    ]:
        with pytest.raises(PermissionDenied):
            require_operator(ident, claimed)


def test_errors_map_to_statuses_in_one_place():
    assert status_for(PermissionDenied("x")) == grpc.StatusCode.PERMISSION_DENIED
    assert status_for(ConfigError("x")) == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_servicer_that_only_registers_opaque_handlers_is_refused(districts):
    store = TrustStore(districts["500111"].config)
    guard = AuthInterceptor(CallerVerifier(store), POLICY, Metrics())
    server = grpc.aio.server()
    guarded = GuardedServer(server, guard)
    guarded.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("x.Y", {}),))
    with pytest.raises(ConfigError):
        guarded.check_complete()
    await server.stop(None)


def test_configured_rules_replace_defaults_per_key_and_can_name_identities(tmp_path):
    from broker.node.config import load_config

    base = (
        'district = "500111"\nlisten = "127.0.0.1:0"\n'
        '[tls]\nca_file = "a"\ncert_file = "b"\nkey_file = "c"\n'
        '[registry]\npath = "r"\n[privacy]\nhash_key_file = "h"\n'
    )
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(
        base + "[access]\n"
        '"yikatong.v1.Gate/Check" = ["spiffe://500111.yikatong.cy/operator/bus-*"]\n'
        '"grpc.reflection.v1alpha.ServerReflection/*" = []\n'
    )
    cfg = load_config(cfg_file, env={})
    policy = AccessPolicy("500111", frozenset(), cfg.access)
    policy.authorize(CHECK, operator_identity("500111", "bus-07"))
    with pytest.raises(PermissionDenied, match="is for spiffe://500111"):
        policy.authorize(CHECK, operator_identity("500111", "museum-01"))
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    with pytest.raises(PermissionDenied, match="is for nobody"):
        policy.authorize(reflection, node_identity("500111"))
    policy.authorize("/grpc.health.v1.Health/Check", node_identity("500111"))  # default kept
    cfg_file.write_text(base + '[access]\n"yikatong.v1.Gate/*" = ["root"]\n')
    with pytest.raises(ConfigError, match="unknown principal 'root'"):
        load_config(cfg_file, env={})
