"""A client in another language (Node.js grpc-js), given only proto/ and certificates.

Calls Gate.Check as an operator (also over TLS 1.2, which the node refuses
per call), Recognize as a peer node, health and reflection. Needs node and
npm (the test installs the client's two packages from package-lock.json);
skips without them locally and fails in CI.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

from broker.cards.model import shanghai_day
from broker.trust.config import node_server_name
from tests.conftest import ANYUE, DAZU, Cluster, unavailable

CLIENT = Path(__file__).parent / "interop" / "node"
PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


def node_client() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable("node and npm are needed for the cross-language client test")
        return ""
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--silent"],
            cwd=CLIENT,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return node


async def test_a_nodejs_client_calls_check_recognize_health_and_reflection(
    cluster: Cluster, tmp_path: Path, now: datetime
):
    node = node_client()
    dazu, anyue = cluster.setups[DAZU], cluster.setups[ANYUE]
    today = shanghai_day(now)
    card = next(c for c in anyue.cards if c.status == "active" and c.valid_until >= today)
    cfg = {
        "proto_root": str(PROTO_ROOT),
        "address": cluster.nodes[DAZU].address,
        "server_name": node_server_name(DAZU),
        "ca": str(dazu.paths.ca_cert),
        "operator_cert": str(dazu.operator_cert),
        "operator_key": str(dazu.operator_key),
        "operator_id": dazu.operator_id,
        "node_cert": str(dazu.paths.node_cert),
        "node_key": str(dazu.paths.node_key),
        "peer_address": cluster.nodes[ANYUE].address,
        "peer_server_name": node_server_name(ANYUE),
        "peer_ca": str(anyue.paths.ca_cert),
        "peer_card": {"issuer_region": card.ref.issuer_region, "card_number": card.ref.card_number},
    }
    cfg_file = tmp_path / "interop.json"
    cfg_file.write_text(json.dumps(cfg))
    # The nodes run on this test's event loop: the client runs beside it, not blocking it.
    proc = await asyncio.create_subprocess_exec(
        node,
        str(CLIENT / "client.js"),
        str(cfg_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    got = json.loads(out)
    assert got["check"]["status"] == "CARD_STATUS_ACTIVE"
    assert got["check"]["source"] == "DECISION_SOURCE_PEER"
    assert got["check"]["allow"] is True
    assert got["check_bad"] == {
        "error": "INVALID_ARGUMENT",
        "details": "card.issuer_region: must be a 6-digit administrative division code",
    }
    assert got["check_tls12"]["error"] == "PERMISSION_DENIED"
    assert "TLSv1.2 is below the minimum TLS 1.3" in got["check_tls12"]["details"]
    assert got["recognize"]["status"] == "CARD_STATUS_ACTIVE"
    assert set(got["recognize"]) == {
        "status",
        "entitlements",
        "cache_ttl_seconds",
        "position",
        "max_stale_seconds",
    }
    assert set(got["recognize"]["position"]) <= {"epoch", "seq", "mark"}  # nothing of the holder
    assert got["health"] == {"status": "SERVING"}
    assert {"yikatong.v1.Gate", "yikatong.v1.Recognition", "grpc.health.v1.Health"} <= set(
        got["services"]
    )
    assert got["gate_descriptor_bytes"] is True
