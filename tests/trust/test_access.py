"""Access rights (deny by default) and the guard every registered handler gets."""

from __future__ import annotations

import grpc
import pytest

from broker.core.errors import ConfigError, InvalidArgument, PermissionDenied
from broker.node.guard import AuthInterceptor, GuardedServer, status_for
from broker.node.metrics import Metrics
from broker.trust.access import (
    DEFAULT_RULES,
    OPERATOR_METHODS,
    AccessPolicy,
    compile_pattern,
    require_operator,
    validate_rules,
)
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
        (node_identity("500111"), "bus-01"),
    ]:
        with pytest.raises(PermissionDenied):
            require_operator(ident, claimed)
    with pytest.raises(InvalidArgument, match="operator_id: is required"):
        require_operator(operator_identity("500111", "bus-01"), "")


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
        '[tls]\nca_file = "a"\ncert_file = "b"\nkey_file = "c"\ncrl_file = "d"\n'
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


OPERATOR_CALLS = [
    CHECK,
    "/yikatong.v1.Settlement/SubmitTrips",
    "/yikatong.v1.Settlement/GetTripOutcomes",
    "/yikatong.v1.Settlement/GetStatement",
]
WIDE_PRINCIPALS = [
    "any",
    "spiffe://*.yikatong.cy/operator/bus-01",
    "spiffe://*.yikatong.cy/operator/*",
    "spiffe://512021.yikatong.cy/operator/bus-01",
]


def wide_policy(principal: str) -> AccessPolicy:
    """Our node, with every operator method granted to ``principal`` as well as our operators."""
    granted = {m.lstrip("/"): ("own-operators", principal) for m in OPERATOR_CALLS}
    return AccessPolicy("500111", frozenset({"512021"}), {**DEFAULT_RULES, **granted})


@pytest.mark.parametrize("principal", WIDE_PRINCIPALS)
@pytest.mark.parametrize("method", OPERATOR_CALLS)
def test_another_districts_operator_is_refused_operator_methods_whatever_the_rules_grant(
    method, principal
):
    """District 512021's bus-01 may not act as our bus-01, even where a rule matches it."""
    policy = wide_policy(principal)
    policy.authorize(method, operator_identity("500111", "bus-01"))  # ours still may
    name = method.lstrip("/")
    expected = (
        f"operator of district 512021 may not call {name} on district 500111's node"
        " (spiffe://512021.yikatong.cy/operator/bus-01)"
    )
    with pytest.raises(PermissionDenied) as info:
        policy.authorize(method, operator_identity("512021", "bus-01"))
    assert str(info.value) == expected


@pytest.mark.parametrize("method", OPERATOR_CALLS)
def test_operator_methods_are_for_operators_even_when_any_is_granted(method):
    policy = wide_policy("any")
    with pytest.raises(PermissionDenied, match="acts for an operator"):
        policy.authorize(method, node_identity("500111"))
    with pytest.raises(PermissionDenied, match="node of district 512021 may not call"):
        policy.authorize(method, node_identity("512021"))


def test_a_whole_gate_service_grant_is_bound_to_our_operators_too():
    policy = AccessPolicy("500111", frozenset(), {**DEFAULT_RULES, "yikatong.v1.Gate/*": ("any",)})
    with pytest.raises(
        PermissionDenied, match=r"district 512021 may not call yikatong\.v1\.Gate/Any"
    ):
        policy.authorize("/yikatong.v1.Gate/Any", operator_identity("512021", "bus-01"))


def test_rules_still_narrow_operator_methods_to_some_of_our_operators():
    policy = AccessPolicy(
        "500111",
        frozenset(),
        {**DEFAULT_RULES, "yikatong.v1.Gate/*": ("spiffe://500111.yikatong.cy/operator/bus-*",)},
    )
    policy.authorize(CHECK, operator_identity("500111", "bus-02"))
    with pytest.raises(PermissionDenied, match="is for spiffe://"):
        policy.authorize(CHECK, operator_identity("500111", "museum-01"))


def test_the_binding_leaves_methods_for_anyone_open_to_other_districts_operators():
    wide_policy("any").authorize("/grpc.health.v1.Health/Check", operator_identity("512021", "x"))


def test_the_operator_methods_are_exactly_those_the_defaults_give_our_operators():
    own = {key for key, principals in DEFAULT_RULES.items() if principals == ("own-operators",)}
    assert own == OPERATOR_METHODS


@pytest.mark.parametrize(
    ("pattern", "spiffe_id", "matches"),
    [
        ("spiffe://500111.yikatong.cy/operator/bus-*", "/operator/bus-01", True),
        ("spiffe://500111.yikatong.cy/operator/bus-*", "/operator/bus-1-2", True),
        ("spiffe://500111.yikatong.cy/operator/bus-*", "/operator/bus-01/x", False),
        ("spiffe://500111.yikatong.cy/operator/bus-*", "/operator/museum-01", False),
        ("spiffe://500111.yikatong.cy/*", "/node", True),
        ("spiffe://500111.yikatong.cy/*", "/operator/bus-01", False),  # fnmatch crossed '/'
        ("spiffe://500111.yikatong.cy/op*/bus-01", "/operator/bus-01", True),
        ("spiffe://500111.yikatong.cy/op*", "/operator/bus-01", False),
        ("spiffe://500111.yikatong.cy/operator/bus-01", "/operator/bus-01", True),
        ("spiffe://500111.yikatong.cy/operator/bus-01", "/operator/bus-011", False),
    ],
)
def test_a_star_in_the_path_matches_within_one_segment(pattern, spiffe_id, matches):
    full = "spiffe://500111.yikatong.cy" + spiffe_id
    assert (compile_pattern(pattern).fullmatch(full) is not None) is matches


@pytest.mark.parametrize(
    ("spiffe_id", "matches"),
    [
        ("spiffe://512021.yikatong.cy/node", True),
        ("spiffe://500111.yikatong.cy/node", True),
        ("spiffe://a.512021.yikatong.cy/node", False),  # '*' does not cross '.'
        ("spiffe://evil.cy/x.yikatong.cy/node", False),  # nor '/'
        ("spiffe://512021.yikatong.cy/operator/node", False),
        ("spiffe://512021xyikatong.cy/node", False),  # '.' is literal, not any character
    ],
)
def test_a_star_in_the_trust_domain_matches_within_one_label(spiffe_id, matches):
    assert (compile_pattern("spiffe://*.yikatong.cy/node").fullmatch(spiffe_id) is not None) is (
        matches
    )


@pytest.mark.parametrize(
    ("principal", "reason"),
    [
        ("spiffe://500111.yikatong.cy/operator/**", "'\\*\\*' is not a pattern"),
        ("spiffe://**.yikatong.cy/node", "'\\*\\*' is not a pattern"),
        ("spiffe://500111.yikatong.cy/operator/bus-0?", "'\\?' and '\\[' are not patterns"),
        ("spiffe://500111.yikatong.cy/operator/bus-[01]", "are not patterns"),
        ("spiffe://500111.yikatong.cy/operator/bus\\*", "are not patterns"),
        ("spiffe://500111.yikatong.cy", "spiffe://<trust domain>/<path>"),
        ("spiffe://500111.yikatong.cy/operator/", "spiffe://<trust domain>/<path>"),
        ("spiffe://500111.yikatong.cy//node", "spiffe://<trust domain>/<path>"),
        ("spiffe:///node", "spiffe://<trust domain>/<path>"),
        ("spiffe://500111.YIKATONG.cy/node", "spiffe://<trust domain>/<path>"),
        ("spiffe://500111.yikatong.cy/operator/../node", "no '.' or '..' segments"),
        ("500111.yikatong.cy/operator/bus-01", "unknown principal"),
        ("https://500111.yikatong.cy/node", "unknown principal"),
    ],
)
def test_malformed_patterns_are_refused_naming_the_key(principal, reason):
    with pytest.raises(ValueError, match=reason) as info:
        validate_rules({"yikatong.v1.Gate/Check": [principal]})
    assert str(info.value).startswith("access.yikatong.v1.Gate/Check: ")


def test_a_policy_refuses_to_be_built_on_a_malformed_pattern():
    with pytest.raises(ValueError, match="'\\*\\*'"):
        AccessPolicy("500111", frozenset(), {"yikatong.v1.Gate/*": ("spiffe://**",)})


def test_the_config_loader_refuses_a_malformed_pattern_naming_the_key(tmp_path):
    from broker.node.config import load_config

    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(
        'district = "500111"\nlisten = "127.0.0.1:0"\n'
        '[tls]\nca_file = "a"\ncert_file = "b"\nkey_file = "c"\ncrl_file = "d"\n'
        '[registry]\npath = "r"\n[privacy]\nhash_key_file = "h"\n'
        "[access]\n"
        '"yikatong.v1.Settlement/GetStatement" = ["spiffe://500111.yikatong.cy/**"]\n'
    )
    with pytest.raises(ConfigError, match=r"^access\.yikatong\.v1\.Settlement/GetStatement: "):
        load_config(cfg_file, env={})
