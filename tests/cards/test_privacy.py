"""Privacy by construction: card and ID numbers never reach logs or the registry file."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from broker.cards.model import CardRef, Scene
from tests.conftest import ANYUE, DAZU, Cluster
from tests.helpers import import_lines, ssn_for


@pytest.fixture
def all_levels() -> Iterator[None]:
    structlog.reset_defaults()  # every level, whatever an earlier test configured
    yield
    structlog.reset_defaults()


async def test_no_card_or_id_number_in_any_log_event_or_the_registry_file(
    cluster: Cluster, now: datetime, all_levels: None
):
    secret_ssn = ssn_for(ANYUE, "19500101")
    import_lines(
        cluster.setups[ANYUE], [f"PRIVATE00001,{secret_ssn},active,false,false,2035-01-01"], now
    )
    numbers = ["PRIVATE00001", "NOSUCH000009", "C500118000001", "BADOP0000001"]
    with capture_logs() as events:
        gate = cluster.gate(DAZU)
        for ref in (
            CardRef(ANYUE, numbers[0]),
            CardRef(ANYUE, numbers[1]),
            CardRef("500118", numbers[2]),
            CardRef(DAZU, numbers[1]),
        ):
            await gate.check(ref, Scene.BUS)
        refused = cluster.gate(DAZU, operator_id="not-me")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await refused.check(CardRef(ANYUE, numbers[3]), Scene.BUS)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert {e["event"] for e in events} >= {"recognized", "peer_answer", "call_refused"}
    text = repr(events)
    for secret in [*numbers, secret_ssn, "19500101"]:
        assert secret not in text
    for code in (DAZU, ANYUE):
        raw = cluster.setups[code].config.registry.path.read_bytes()
        assert secret_ssn.encode() not in raw
        wal = cluster.setups[code].config.registry.path.with_name("registry.sqlite3-wal")
        if wal.exists():
            assert secret_ssn.encode() not in wal.read_bytes()
