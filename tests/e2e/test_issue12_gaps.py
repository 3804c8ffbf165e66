"""Issue 12 done-when lines checked end to end, on SQLite and on PostgreSQL (an audit's gaps).

- Item 1 from outside: a SETTLED day's statement (``broker settle statement --district``)
  equals the figures of the two signed position documents each side stored; a late trip
  of the day, accepted by time at an intake whose clock is still inside the late window,
  is refused ``too_late`` by the sealed ledger and changes nothing; and with every node
  stopped, ``broker settle confirm`` reports the settled day with the documents' figures
  even after the batch tables were changed behind the broker's back, and does not report
  a day without stored documents as settled.
- Item 7 on both databases: today is neither closed (unless ``--force``) nor confirmed
  before it ends.
- A crash that is not the close's: the intake process killed after its commit (kill -9);
  after the resubmission, the day closed and ``broker settle check`` is clean on both sides.

Figures are compared with the documents as stored (plain JSON), and with the claims
recomputed from the raw trips by tests/clearing_day.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result

from broker._proto.yikatong.v1 import settlement_pb2
from broker.cards.model import Scene, shanghai_day
from broker.cli.main import main
from broker.node.config import NodeConfig
from broker.node.server import Node
from broker.settlement.clearing.crash import PAUSE_ENV, PAUSE_FILE_ENV
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.days import day_end
from broker.testbed.clock import DayClock
from tests.clearing_day import (
    SentTrip,
    after_day,
    after_window,
    assert_positions_match,
    cli,
    district_positions,
    expected_claim,
    operator_stub,
    record_for,
    simulate_day,
)
from tests.conftest import ANYUE, DAZU, THREE, Cluster


async def settle(
    cluster: Cluster, code: str, *args: str, clock: Callable[[], datetime] | None = None
) -> Result:
    """``broker settle ARGS --config <code's>`` in-process; its exit status is not raised."""
    cfg = str(cluster.setups[code].config_path)
    invoke = functools.partial(
        CliRunner().invoke,
        main,
        ["--log-level", "warning", "settle", args[0], "--config", cfg, *args[1:]],
        obj={"clock": clock or cluster.clock},
    )
    return await asyncio.to_thread(invoke)


def flat(text: str) -> str:
    return " ".join(text.split())


def documents(config: NodeConfig, period: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The signed position documents a district stored for ``period``: counterparty → side."""
    store = ClearingStore.open(config)
    try:
        rows = store.db.all(
            "SELECT counterparty, side, document FROM position_documents WHERE period = ?",
            (period,),
        )
    finally:
        store.close()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for counterparty, side, document in rows:
        out.setdefault(str(counterparty), {})[str(side)] = json.loads(str(document))
    return out


def confirm_rows(output: str) -> dict[str, tuple[str, str]]:
    """``broker settle confirm``'s table: counterparty → (net in yuan, state)."""
    rows = {}
    for line in output.splitlines():
        m = re.search(r"\b(\d{6})[\s│|]+(-?\d+\.\d{2})[\s│|]+(\w+)", line)
        if m:
            rows[m[1]] = (m[2], m[3])
    return rows


def yuan(fen: int) -> str:
    return f"{'-' if fen < 0 else ''}{abs(fen) // 100}.{abs(fen) % 100:02d}"


async def submit(
    cluster: Cluster, code: str, records: list[settlement_pb2.TripRecord]
) -> list[str]:
    ch, stub = operator_stub(cluster.setups[code], cluster.nodes[code].address)
    try:
        reply = await stub.SubmitTrips(settlement_pb2.SubmitTripsRequest(trips=records), timeout=30)
    finally:
        await ch.close()  # type: ignore[attr-defined]
    return [r.reason for r in reply.results]


async def resolve_inactive(cluster: Cluster, trips: list[SentTrip]) -> None:
    """Settle by hand the lines of lost or expired cards (rejected by their homes)."""
    for t in trips:
        if not t.active:
            await cli(
                "settle",
                "resolve",
                "--config",
                str(cluster.setups[t.serving].config_path),
                "--district",
                t.home,
                "--operator",
                t.record.operator_id,
                "--trip",
                t.record.trip_id,
                "--note",
                "card not active when used: the operator bears it",
            )


async def stop_every_node(cluster: Cluster) -> None:
    for node in cluster.nodes.values():
        await node.stop(grace=0.2)
    cluster.nodes = {}  # stopped: the fixture has none left to stop


async def test_a_settled_day_is_what_both_signed_and_stays_so_with_every_node_stopped(
    day_cluster: Cluster, now: datetime
) -> None:
    cluster, clock = day_cluster, day_cluster.clock
    trips = await simulate_day(cluster, now, per_pair=2)
    days = {
        shanghai_day(t.record.occurred_at.ToDatetime().replace(tzinfo=now.tzinfo)) for t in trips
    }
    assert len(days) == 1, "the simulated trips straddle midnight; rerun"
    day = days.pop()
    period = day.isoformat()

    # ---- Item 7: before the day ends, no close (unless forced) and no confirm.
    forced = clock() < day_end(day) - timedelta(seconds=30)
    if forced:
        ends = f"it ends at {(day + timedelta(days=1)).isoformat()}T00:00+08:00"
        refused = await settle(cluster, DAZU, "close", "--period", period)
        assert refused.exit_code == 1, refused.output
        assert f"cannot close {period}: the day has not ended; {ends}" in flat(refused.output)
        early = await settle(cluster, DAZU, "close", "--period", period, "--force")
        assert early.exit_code == 0 and "close #1" in early.output, early.output
        # Confirm refuses the day, which has not even ended, and settles nothing.
        not_yet = await settle(cluster, DAZU, "confirm", "--period", period)
        assert not_yet.exit_code == 1, not_yet.output
        assert "the day has not ended" in flat(not_yet.output)
        assert "settled" not in not_yet.output

    # ---- The day closed the next morning; a trip of the next day closed too, later.
    clock.reach(after_day(period))
    for code in THREE:
        out = await cli(
            "settle", "close", "--config", str(cluster.setups[code].config_path),
            "--period", period, clock=clock,
        )  # fmt: skip
        expect = "nothing new to send" if forced and code == DAZU else "close #1"
        assert expect in out, (code, out)
    await resolve_inactive(cluster, trips)
    next_day = (day + timedelta(days=1)).isoformat()
    anyue_card = next(
        c
        for c in cluster.setups[ANYUE].cards
        if c.status == "active" and c.valid_until > day + timedelta(days=7)
    )
    tomorrow = record_for(
        cluster.setups[DAZU], "next-day-1", anyue_card, Scene.BUS,
        day_end(day) + timedelta(seconds=20), None,
    )  # fmt: skip
    assert await submit(cluster, DAZU, [tomorrow]) == ["ok"]

    # ---- After both late windows: both days sealed and closed; only the first confirmed.
    clock.reach(after_window(next_day))
    for p in (period, next_day):
        for code in THREE:
            await cli(
                "settle", "close", "--config", str(cluster.setups[code].config_path),
                "--period", p, clock=clock,
            )  # fmt: skip
    for code in THREE:
        confirmed = await settle(cluster, code, "confirm", "--period", period)
        assert confirmed.exit_code == 0, (code, confirmed.output)
    await assert_positions_match(cluster.setups, trips, period)

    signed: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for code in THREE:
        docs = documents(cluster.setups[code].config, period)
        assert set(docs) == set(THREE) - {code}, (code, docs)
        for other, pair in docs.items():
            own, theirs = pair["own"], pair["theirs"]
            assert (own["from"], own["to"], own["period"]) == (code, other, period)
            assert (theirs["from"], theirs["to"], theirs["period"]) == (other, code, period)
            # the answering side's document says it agreed (whichever side asked)
            assert [own.get("agreed"), theirs.get("agreed")].count(True) == 1, pair
            assert (theirs["receivable_fen"], theirs["payable_fen"]) == (
                own["payable_fen"],
                own["receivable_fen"],
            )
        signed[code] = docs

    async def statement_is_the_signed_figures() -> None:
        for code in THREE:
            view = await district_positions(cluster.setups[code], period)
            got = {
                p["counterparty"]: (p["state"], p["receivable_fen"], p["payable_fen"])
                for p in view["positions"]
            }
            assert got == {
                other: ("settled", pair["own"]["receivable_fen"], pair["own"]["payable_fen"])
                for other, pair in signed[code].items()
            }, code

    await statement_is_the_signed_figures()

    # ---- A late trip of the settled day, through an intake whose clock is still inside the
    # late window (an hour after the day's end): accepted by time, refused by the sealed ledger.
    await cluster.nodes[DAZU].stop(grace=0.2)
    lagging = DayClock()
    lagging.move_to(after_day(period) + timedelta(hours=1))
    cluster.nodes[DAZU] = await Node.start(cluster.setups[DAZU].config, lagging)
    late = record_for(
        cluster.setups[DAZU], "late-after-settled", anyue_card, Scene.BUS,
        day_end(day) - timedelta(minutes=30), None,
    )  # fmt: skip
    assert await submit(cluster, DAZU, [late]) == ["too_late"]
    for code in THREE:
        out = await cli(
            "settle", "close", "--config", str(cluster.setups[code].config_path),
            "--period", period, clock=clock,
        )  # fmt: skip
        assert "nothing new to send" in out, (code, out)
        checked = await cli(
            "settle", "check", "--config", str(cluster.setups[code].config_path),
            "--period", period,
        )  # fmt: skip
        assert "PROBLEM" not in checked and "0 not closed yet" in checked, checked
    await statement_is_the_signed_figures()

    # ---- Every node stopped; Dazu's batch figures changed behind the broker's back.
    await stop_every_node(cluster)
    dazu_store = ClearingStore.open(cluster.setups[DAZU].config)
    try:
        with dazu_store.db.write():
            dazu_store.db.execute(
                "UPDATE out_batches SET accepted_claim_fen = accepted_claim_fen + 36624 "
                "WHERE period = ?",
                (period,),
            )
    finally:
        dazu_store.close()
    for code in THREE:
        again = await settle(cluster, code, "confirm", "--period", period)
        assert again.exit_code == 0, (code, again.output)
        rows = confirm_rows(again.output)
        assert rows == {
            other: (yuan(pair["own"]["receivable_fen"] - pair["own"]["payable_fen"]), "settled")
            for other, pair in signed[code].items()
        }, (code, again.output)
    await statement_is_the_signed_figures()

    # The next day was sealed but never confirmed: with every node stopped it stays unsettled.
    held = await settle(cluster, DAZU, "confirm", "--period", next_day)
    assert held.exit_code == 1, held.output
    assert confirm_rows(held.output)[ANYUE][1] != "settled", held.output
    assert documents(cluster.setups[DAZU].config, next_day) == {}
    view = await district_positions(cluster.setups[DAZU], next_day)
    assert {p["counterparty"]: p["state"] for p in view["positions"]} == {ANYUE: "acked"}


async def test_check_is_clean_after_the_intake_process_is_killed_after_its_commit(
    day_cluster: Cluster, now: datetime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of Dazu's intake process between its commit and its answer; the operator
    submits again; the day closes and ``broker settle check`` is clean on both sides."""
    cluster = day_cluster
    release = tmp_path / "release"
    monkeypatch.setenv(PAUSE_ENV, "intake_recorded")  # the worker is spawned at the first
    monkeypatch.setenv(PAUSE_FILE_ENV, str(release))  # request and inherits these
    dazu, gate = cluster.setups[DAZU], cluster.gate(DAZU)
    when = now - timedelta(minutes=10)
    sent = []
    for i, card in enumerate([c for c in cluster.setups[ANYUE].cards if c.status == "active"][:6]):
        decision = await gate.check(card.ref, Scene.BUS)
        assert decision.allow, decision.reason
        rec = record_for(dazu, f"k-{i}", card, Scene.BUS, when + timedelta(seconds=i), decision)
        sent.append(SentTrip(DAZU, rec, True))
    records = [t.record for t in sent]
    node = cluster.nodes[DAZU]
    assert node.intake is not None
    call = asyncio.ensure_future(submit(cluster, DAZU, records))
    try:
        reached = release.with_name("release.reached")
        for _ in range(1500):
            if reached.exists():
                break
            await asyncio.sleep(0.02)
        assert reached.exists(), "the intake process did not reach its commit"
        pid = node.intake.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.touch()
    assert await submit(cluster, DAZU, records) == ["ok"] * len(records)

    period = shanghai_day(when).isoformat()
    cluster.clock.reach(after_day(period))
    for code in (DAZU, ANYUE):
        await cli(
            "settle", "close", "--config", str(cluster.setups[code].config_path),
            "--period", period, clock=cluster.clock,
        )  # fmt: skip
    for code in (DAZU, ANYUE):
        checked = await cli(
            "settle", "check", "--config", str(cluster.setups[code].config_path),
            "--period", period,
        )  # fmt: skip
        assert "PROBLEM" not in checked, checked
    checked = await cli("settle", "check", "--config", str(dazu.config_path), "--period", period)
    assert f"{len(sent)} accepted trip(s)" in checked and f"{len(sent)} in batches" in checked
    mine = await district_positions(dazu, period)
    owed = sum(expected_claim(t) for t in sent)
    assert [(p["counterparty"], p["receivable_fen"]) for p in mine["positions"]] == [(ANYUE, owed)]
    theirs = await district_positions(cluster.setups[ANYUE], period)
    assert [(p["counterparty"], p["payable_fen"]) for p in theirs["positions"]] == [(DAZU, owed)]


def test_the_confirm_table_reader_reads_a_row() -> None:
    """The helper above, on a row as ``broker settle confirm`` prints it."""
    row = "│ 512021 │ -12.05 │ settled │       │"
    assert confirm_rows(row) == {"512021": ("-12.05", "settled")}
    assert yuan(-1205) == "-12.05" and yuan(7) == "0.07"
