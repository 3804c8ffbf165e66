"""What a home district refuses: tampered batches, foreign keys, unpublished fare rules;
caps counted across districts; disputes represented once, then final."""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker._proto.yikatong.v1 import settlement_pb2, settlement_pb2_grpc
from broker.cards.entitlements import entitlements_for
from broker.cards.model import Entitlement, Scene, shanghai_day
from broker.core.signing import Purpose, Signer
from broker.fares.rules import fares_document, load_fares
from broker.settlement.clearing.batch import Digest, Line, Totals, encode_lines
from broker.settlement.trips import Trip
from broker.testbed.build import DistrictSetup, SyntheticCard
from tests.clearing_day import after_day, cli, district_positions, operator_stub, record_for
from tests.conftest import ANYUE, DAZU, RONGCHANG, Cluster
from tests.helpers import node_channel


def anyue_card(cluster: Cluster, want: Entitlement | None = None) -> SyntheticCard:
    today = shanghai_day(datetime.now().astimezone())
    for c in cluster.setups[ANYUE].cards:
        if c.status != "active" or c.valid_until < today:
            continue
        held = entitlements_for(c.birth_date, c.disabled, c.student, today)
        if want is None and not held:
            return c
        if want is not None and want in held:
            return c
    raise AssertionError("no such card in the testbed")


def full_fare_line(card: SyntheticCard, trip_id: str, when: datetime, version: str) -> Line:
    trip = Trip(
        operator_id="transit-01",
        trip_id=trip_id,
        card=card.ref,
        scene=Scene.BUS,
        place_id="",
        occurred_at=when,
        gross_fare_fen=200,
        charged_fen=200,
        concession_fen=0,
        applied_entitlement=None,
        fare_version=version,
    )
    return Line(trip, "", 200)  # collected through home: the charged fare is claimed


def parts(
    lines: list[Line], signer: Signer, period: str, seq: int, tamper: bool = False
) -> list[settlement_pb2.BatchPart]:
    chunk = encode_lines(lines)
    digest, totals = Digest(), Totals()
    digest.update(chunk)
    for line in lines:
        totals.add(line)
    header = signer.sign(
        {
            "type": "batch",
            "from": DAZU,
            "to": ANYUE,
            "period": period,
            "sequence": seq,
            "kind": "close",
            "created_at": "2026-11-28T00:00:00+00:00",
            **totals.as_doc(),
            "digest": digest.hexdigest(),
            "chunks": 1,
        },
        Purpose.BATCH,
    )
    if tamper:  # one amount changed after signing
        changed = [Line(lines[0].trip, lines[0].scheme, lines[0].claimed_fen + 100), *lines[1:]]
        chunk = encode_lines(changed)
    return [
        settlement_pb2.BatchPart(lines=chunk),
        settlement_pb2.BatchPart(
            trailer=settlement_pb2.SignedDocument(
                document=header.document, key_id=header.key_id, signature=header.signature
            )
        ),
    ]


async def exchange(cluster: Cluster, batch: list[settlement_pb2.BatchPart]) -> list[object]:
    ch = node_channel(cluster.nodes[ANYUE].address, cluster.setups[ANYUE], cluster.setups[DAZU])
    try:
        stub = settlement_pb2_grpc.SettlementStub(ch)

        async def send():
            for p in batch:
                yield p

        return [p async for p in stub.ExchangeBatch(send(), timeout=10)]
    finally:
        await ch.close()


def dazu_signer(cluster: Cluster) -> Signer:
    return Signer.from_file(cluster.setups[DAZU].paths.settlement_key)


async def publish_dazu_fares(cluster: Cluster) -> None:
    s = cluster.setups[DAZU]
    assert s.config.fares.file is not None
    signed = dazu_signer(cluster).sign(
        {"type": "fares", **fares_document(load_fares(s.config.fares.file)), "district": DAZU},
        Purpose.FARES,
    )
    ch = node_channel(cluster.nodes[ANYUE].address, cluster.setups[ANYUE], s)
    try:
        reply = await settlement_pb2_grpc.SettlementStub(ch).PublishFares(
            settlement_pb2.SignedDocument(
                document=signed.document, key_id=signed.key_id, signature=signed.signature
            ),
            timeout=10,
        )
        assert list(reply.versions) == ["sample-1"]
    finally:
        await ch.close()


async def test_tampered_batch_and_foreign_keys_are_refused_and_nothing_is_stored(
    cluster: Cluster, now: datetime
):
    await publish_dazu_fares(cluster)
    when = now - timedelta(minutes=5)
    period = shanghai_day(when).isoformat()
    lines = [full_fare_line(anyue_card(cluster), "tt-1", when, "sample-1")]

    with pytest.raises(grpc.aio.AioRpcError) as tampered:
        await exchange(cluster, parts(lines, dazu_signer(cluster), period, 1, tamper=True))
    assert tampered.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "digest" in (tampered.value.details() or "")

    stranger = Signer(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(grpc.aio.AioRpcError) as unknown_key:
        await exchange(cluster, parts(lines, stranger, period, 1))
    assert "not trusted" in (unknown_key.value.details() or "")

    stranger.key_id = dazu_signer(cluster).key_id  # a forged signature under Dazu's key id
    with pytest.raises(grpc.aio.AioRpcError) as forged:
        await exchange(cluster, parts(lines, stranger, period, 1))
    assert "signature does not verify" in (forged.value.details() or "")

    # Nothing of the refused batches was kept: the genuine one is accepted as new.
    reply = await exchange(cluster, parts(lines, dazu_signer(cluster), period, 1))
    ack = reply[-1].ack  # type: ignore[attr-defined]
    assert b'"accepted":1' in ack.document and b'"rejected":0' in ack.document
    # The same batch again: the same acknowledgement; other content under its number: refused.
    assert (await exchange(cluster, parts(lines, dazu_signer(cluster), period, 1)))[-1] == reply[-1]
    other = [full_fare_line(anyue_card(cluster), "tt-2", when, "sample-1")]
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await exchange(cluster, parts(other, dazu_signer(cluster), period, 1))
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_line_priced_with_unpublished_rules_is_rejected(cluster: Cluster, now: datetime):
    await publish_dazu_fares(cluster)
    when = now - timedelta(minutes=5)
    card = anyue_card(cluster)
    lines = [
        full_fare_line(card, "up-1", when, "sample-1"),
        full_fare_line(card, "up-2", when, "ghost-9"),
        full_fare_line(card, "up-1", when, "sample-1"),  # the same trip twice in one batch
    ]
    reply = await exchange(
        cluster, parts(lines, dazu_signer(cluster), shanghai_day(when).isoformat(), 1)
    )
    verdicts = settlement_pb2.LineVerdicts.FromString(reply[0].verdicts).verdicts  # type: ignore[attr-defined]
    assert [(v.line_no, v.code) for v in verdicts] == [(1, "UNPUBLISHED_FARES"), (2, "DUPLICATE")]


async def submit(cluster: Cluster, serving: str, records: list[settlement_pb2.TripRecord]) -> None:
    s = cluster.setups[serving]
    ch, stub = operator_stub(s, cluster.nodes[serving].address)
    try:
        reply = await stub.SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=records), timeout=10)
        assert [r.reason for r in reply.results] == ["ok"] * len(records), reply
    finally:
        await ch.close()  # type: ignore[attr-defined]


async def priced(cluster: Cluster, serving: str, card: SyntheticCard, trip_id: str, when: datetime):
    decision = await cluster.gate(serving).check(card.ref, Scene.BUS)
    return record_for(cluster.setups[serving], trip_id, card, Scene.BUS, when, decision)


@pytest.fixture
def tight_caps(districts: dict[str, DistrictSetup]) -> dict[str, DistrictSetup]:
    """Every district's free senior bus rides capped at 2 a month."""
    for s in districts.values():
        assert s.config.fares.file is not None
        text = s.config.fares.file.read_text()
        s.config.fares.file.write_text(text.replace("per_month = 60", "per_month = 2"))
    return districts


async def test_a_cap_exceeded_across_two_districts_is_caught(tight_caps, cluster: Cluster, now):
    senior = anyue_card(cluster, Entitlement.SENIOR_65)
    base = now - timedelta(minutes=20)
    # One free ride at home (Anyue's own operator), one in Dazu, then one in Rongchang.
    await submit(cluster, ANYUE, [await priced(cluster, ANYUE, senior, "home-1", base)])
    await submit(
        cluster, DAZU, [await priced(cluster, DAZU, senior, "dz-1", base + timedelta(minutes=1))]
    )
    rc = await priced(cluster, RONGCHANG, senior, "rc-1", base + timedelta(minutes=2))
    assert rc.concession_fen == 200 and rc.charged_fen == 0
    await submit(cluster, RONGCHANG, [rc])
    period = shanghai_day(base).isoformat()
    cluster.clock.reach(after_day(period))
    dz = await cli(
        "settle",
        "close",
        "--config",
        str(cluster.setups[DAZU].config_path),
        "--period",
        period,
        clock=cluster.clock,
    )
    rg = await cli(
        "settle",
        "close",
        "--config",
        str(cluster.setups[RONGCHANG].config_path),
        "--period",
        period,
        clock=cluster.clock,
    )
    assert "cap exceeded" in rg
    dz_view = await district_positions(cluster.setups[DAZU], period)
    rc_view = await district_positions(cluster.setups[RONGCHANG], period)
    # Dazu's ride was the second use this month: within the cap, its concession is owed.
    assert dz_view["positions"][0]["receivable_fen"] == 200
    # Rongchang's was the third: it keeps its fare (0 charged) but loses the concession claim.
    assert rc_view["positions"][0]["receivable_fen"] == 0
    assert dz and rg


async def test_a_rejected_line_is_represented_once_then_final(cluster: Cluster, now):
    plain = anyue_card(cluster)  # no entitlement at all
    when = now - timedelta(minutes=5)
    s = cluster.setups[DAZU]
    cfg = str(s.config_path)
    wrong = [record_for(s, f"rp-{i}", plain, Scene.BUS, when, None) for i in (1, 2)]
    for r in wrong:  # claimed as a senior's free ride: the home district will refuse it
        r.charged_fen, r.concession_fen = 0, 200
        r.applied_entitlement = Entitlement.SENIOR_65.value  # type: ignore[assignment]
    await submit(cluster, DAZU, wrong)
    period = shanghai_day(when).isoformat()
    cluster.clock.reach(after_day(period))
    await cli("settle", "close", "--config", cfg, "--period", period, clock=cluster.clock)
    assert (await district_positions(s, period))["positions"][0]["open_disputes"] == 2

    fixed = await cli(
        "settle",
        "represent",
        "--config",
        cfg,
        "--district",
        ANYUE,
        "--operator",
        s.operator_id,
        "--trip",
        "rp-1",
        "--entitlement",
        "none",
        "--charged-fen",
        "200",
        "--concession-fen",
        "0",
    )
    assert "accepted" in fixed
    with pytest.raises(RuntimeError, match="represented once"):
        await cli(
            "settle",
            "represent",
            "--config",
            cfg,
            "--district",
            ANYUE,
            "--operator",
            s.operator_id,
            "--trip",
            "rp-1",
            "--entitlement",
            "none",
        )
    again = await cli(
        "settle",
        "represent",
        "--config",
        cfg,
        "--district",
        ANYUE,
        "--operator",
        s.operator_id,
        "--trip",
        "rp-2",
        "--entitlement",
        "senior_60",
        "--charged-fen",
        "100",
        "--concession-fen",
        "100",
    )
    assert "final" in again
    await cli(
        "settle",
        "resolve",
        "--config",
        cfg,
        "--district",
        ANYUE,
        "--operator",
        s.operator_id,
        "--trip",
        "rp-2",
        "--note",
        "agreed by phone: written off",
    )
    view = await district_positions(s, period)
    pos = view["positions"][0]
    assert pos["open_disputes"] == 0
    assert pos["receivable_fen"] == 200  # the corrected rp-1 (full fare, collected through home)


async def test_thousands_of_rejected_lines_travel_in_chunks_and_all_become_disputes(
    cluster: Cluster, now: datetime
):
    """More rejected lines than fit one chunk, both ways: every one is counted, none lost."""
    from broker.settlement.ledger import open_ledger
    from broker.settlement.trips import ACCEPT

    s = cluster.setups[DAZU]
    lost = next(c for c in cluster.setups[ANYUE].cards if c.status == "lost")
    when = now - timedelta(minutes=30)
    n = 2 * 2000 + 123  # three chunks of lines, three of verdicts
    ledger = open_ledger(s.config.ledger.path, None)
    try:
        ledger.record(
            [
                (
                    full_fare_line(
                        lost, f"lost-{i}", when + timedelta(microseconds=i), "sample-1"
                    ).trip,
                    ACCEPT,
                )
                for i in range(n)
            ],
            now,
        )
    finally:
        ledger.close()
    period = shanghai_day(when).isoformat()
    cluster.clock.reach(after_day(period))
    out = await cli(
        "settle", "close", "--config", str(s.config_path), "--period", period, clock=cluster.clock
    )
    assert str(n) in out
    view = await district_positions(s, period)
    anyue = next(p for p in view["positions"] if p["counterparty"] == ANYUE)
    assert anyue["receivable_fen"] == 0 and anyue["open_disputes"] == n
    home = await district_positions(cluster.setups[ANYUE], period)
    assert next(p for p in home["positions"] if p["counterparty"] == DAZU)["payable_fen"] == 0
