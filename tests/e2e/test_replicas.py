"""Two replicas of one district on one PostgreSQL schema: no race doubles or loses anything.

Anyue runs as two node processes (``python -m broker serve``) with the same
``[ledger]`` url and schema, on two ports; Dazu sends its batches to replica
A, Rongchang to replica B. Closes run as ``python -m broker settle close``
processes. The interleavings are forced, not timed: a process is held at a
named point (``YIKATONG_PAUSE_AT``, broker.settlement.clearing.crash) until
the test lets it go, and the test lets it go only once the other process has
either finished or is seen waiting for a lock (``pg_locks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker._proto.yikatong.v1 import settlement_pb2, types_pb2
from broker.cards.model import Scene, shanghai_day
from broker.core.db import Db
from broker.node.config import load_config, render_config
from broker.node.server import Node
from broker.settlement.clearing.session import open_sender
from broker.settlement.clearing.store import clearing_path
from broker.testbed import build as testbed
from broker.testbed.operator_client import GateClient
from broker.trust.config import PeerConfig
from tests.clearing_day import operator_stub, record_for
from tests.conftest import ANYUE, DAZU, RONGCHANG, THREE
from tests.helpers import wait_healthy

PAUSE = "YIKATONG_PAUSE_AT"


@dataclass
class Replicas:
    setups: dict[str, testbed.DistrictSetup]
    url: str  # "" when the ledgers are SQLite files
    prefix: str
    tmp: Path
    a_config: Path  # replica A: the district's own config (Dazu sends here)
    b_config: Path  # replica B: the same config on another port (Rongchang sends here)
    b_listen: str
    now: datetime
    nodes: dict[str, Node]
    procs: list[asyncio.subprocess.Process]

    def schema(self, code: str) -> str:
        return f"{self.prefix}_{code}"

    def sql(self, code: str, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        ledger = self.setups[code].config.ledger.path
        if ledger is not None:  # SQLite: the clearing tables' file beside the ledger
            with contextlib.closing(sqlite3.connect(clearing_path(ledger))) as db:
                return [tuple(r) for r in db.execute(query.replace("%s", "?"), args)]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {self.schema(code)}")
            return [tuple(r) for r in conn.execute(query, args).fetchall()]

    async def serve(self, config: Path, listen: str, pause_at: str | None = None) -> Path:
        """A replica of Anyue as its own process, healthy; its release file when held."""
        release = self.tmp / f"release-{secrets.token_hex(3)}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("YIKATONG_")}
        if pause_at:
            env.update({PAUSE: pause_at, "YIKATONG_PAUSE_FILE": str(release)})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "--log-level",
            "warning",
            "serve",
            "--config",
            str(config),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.procs.append(proc)
        await wait_healthy(listen, self.setups[ANYUE], self.setups[DAZU])
        return release

    async def start_both(self, pause_a: str | None = None) -> Path:
        release = await self.serve(self.a_config, self.setups[ANYUE].config.listen, pause_a)
        await self.serve(self.b_config, self.b_listen)
        for code in (DAZU, RONGCHANG):
            self.nodes[code] = await Node.start(self.setups[code].config)
        return release

    async def ride(self, serving: str, card: testbed.SyntheticCard, trip_id: str, at: datetime):
        """A trip by ``card`` at ``serving``'s gate, priced there and submitted to its node."""
        setup = self.setups[serving]
        address = self.nodes[serving].address if serving in self.nodes else setup.config.listen
        ch = setup.operator_channel(address)
        try:
            decision = await GateClient(ch, setup.operator_id).check(card.ref, Scene.BUS)
            assert decision.allow
            rec = record_for(setup, trip_id, card, Scene.BUS, at, decision)
        finally:
            await ch.close()
        och, stub = operator_stub(setup, address)
        try:
            reply = await stub.SubmitTrips(
                settlement_pb2.SubmitTripsRequest(trips=[rec]), timeout=10
            )
            assert reply.results[0].outcome == settlement_pb2.TRIP_OUTCOME_ACCEPTED, reply
        finally:
            await och.close()  # type: ignore[attr-defined]
        return decision

    def close(
        self,
        code: str,
        pause_at: str | None = None,
        release: Path | None = None,
        log: Path | None = None,
    ):
        """``broker settle close`` of today (``--force``) as its own process."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("YIKATONG_")}
        if pause_at and release:
            env.update({PAUSE: pause_at, "YIKATONG_PAUSE_FILE": str(release)})
        return run(
            "settle",
            "close",
            "--config",
            str(self.setups[code].config_path),
            "--period",
            shanghai_day(self.now).isoformat(),
            "--force",
            env=env,
            log=log or self.tmp / f"close-{secrets.token_hex(3)}.log",
        )

    def lock_waited_for(self, code: str, name: str) -> bool:
        """Whether a session waits for advisory lock ``name`` of ``code``'s schema."""
        db = Db.open(None, self.url, self.schema(code))
        try:
            key = db.lock_key(name)
        finally:
            db.close()
        return bool(
            self.sql(
                code,
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND objsubid = 1 AND classid::bigint = %s AND objid::bigint = %s",
                ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
            )
        )


async def run(*args: str, env: dict[str, str], log: Path) -> tuple[int, str, int]:
    """``python -m broker ARGS``, its stderr in ``log`` as it comes: (exit code, stderr, pid)."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "--log-level",
            "warning",
            *args,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )
        await proc.wait()
    return proc.returncode or 0, read(log), proc.pid


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def until(condition: Any, what: str) -> None:
    """Poll ``condition()`` (a state, not a duration) until it holds."""
    deadline = asyncio.get_running_loop().time() + 20
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


async def reached(release: Path) -> None:
    await until(lambda: release.with_name(release.name + ".reached").exists(), "paused")


@pytest.fixture
async def replicas(
    request: pytest.FixtureRequest, tmp_path: Path, now: datetime
) -> AsyncIterator[Replicas]:
    """PostgreSQL ledgers, unless a test asks for ``sqlite`` (replicas on one host)."""
    postgres_url: str | None = (
        request.getfixturevalue("postgres_url")
        if getattr(request, "param", "postgres") == "postgres"
        else None
    )
    prefix = f"ykr{secrets.token_hex(3)}"
    setups = testbed.build(
        tmp_path,
        THREE,
        now,
        cards_per_district=60,
        bundle_refresh_s=1,
        ledger_url=postgres_url,
        ledger_schema_prefix=prefix,
    )
    for code in (DAZU, RONGCHANG):  # one free senior bus ride a month: the second is capped
        fares = tmp_path / f"fares-{code}.toml"
        fares.write_text(fares.read_text().replace("per_month = 60", "per_month = 1"))
    a = setups[ANYUE].config
    b = replace(a, listen=f"127.0.0.1:{testbed.free_port()}")
    b_config = tmp_path / f"node-{ANYUE}-b.toml"
    b_config.write_text(render_config(b))
    rc = setups[RONGCHANG]
    rc_b = replace(rc.config, peers=to(rc.config.peers, b.listen))  # Rongchang sends to B
    rc.config_path.write_text(render_config(rc_b))
    setups[RONGCHANG] = replace(rc, config=load_config(rc.config_path, env={}))
    r = Replicas(
        setups,
        postgres_url or "",  # "": SQLite
        prefix,
        tmp_path,
        setups[ANYUE].config_path,
        b_config,
        b.listen,
        now,
        {},
        [],
    )
    try:
        yield r
    finally:
        for node in r.nodes.values():
            await node.stop(grace=0.2)
        for proc in r.procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        if postgres_url is not None:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                for code in THREE:
                    conn.execute(f"DROP SCHEMA IF EXISTS {prefix}_{code} CASCADE")


def to(peers: tuple[PeerConfig, ...], address: str) -> tuple[PeerConfig, ...]:
    """``peers`` with Anyue reached at ``address``."""
    return tuple(replace(p, address=address) if p.district == ANYUE else p for p in peers)


def senior(r: Replicas) -> list[testbed.SyntheticCard]:
    """Anyue's active card-holders of 65 and over with no other entitlement: free bus rides."""
    today = date.today()
    return [
        c
        for c in r.setups[ANYUE].cards
        if c.status == "active"
        and c.valid_until >= today
        and not c.disabled
        and not c.student
        and c.birth_date <= today.replace(year=today.year - 66)
    ]


async def first_done_or(task: Awaitable[Any], condition: Any) -> bool:
    """Wait until ``task`` ends or ``condition()`` holds; whether the task ended."""
    fut = asyncio.ensure_future(task)
    await until(lambda: fut.done() or condition(), "the other process ended or waited")
    return fut.done()


async def test_two_replicas_verifying_batches_of_one_holder_allow_the_capped_ride_once(
    replicas: Replicas, now: datetime
):
    """Caps: A verifies Dazu's batch and is held before its commit; B's verification of
    Rongchang's batch waits for A's (one lock per home district), so it sees A's use of the
    holder's one free ride a month and caps the second."""
    r = replicas
    release = await r.start_both(pause_a="home_before_commit")
    card = senior(r)[0]
    first = await r.ride(DAZU, card, "cap-d", now - timedelta(seconds=40))
    assert first.applied_entitlement == types_pb2.ENTITLEMENT_SENIOR_65 and first.concession_fen
    await r.ride(RONGCHANG, card, "cap-r", now - timedelta(seconds=20))
    dazu = asyncio.ensure_future(r.close(DAZU))
    await reached(release)  # A has counted the ride, holds the lock, has not committed
    rong = asyncio.ensure_future(r.close(RONGCHANG))
    await first_done_or(rong, lambda: r.lock_waited_for(ANYUE, f"verify/{ANYUE}"))
    release.touch()
    assert [(await dazu)[:2], (await rong)[:2]] == [(0, ""), (0, "")]
    codes = r.sql(ANYUE, "SELECT sender, code FROM in_lines ORDER BY sender")
    assert sorted(codes) == sorted([(DAZU, "ACCEPTED"), (RONGCHANG, "CAP_EXCEEDED")])
    assert r.sql(ANYUE, "SELECT count(*) FROM cap_usage") == [(1,)]


async def test_the_same_batch_received_by_two_replicas_gets_the_stored_acknowledgement(
    replicas: Replicas, now: datetime
):
    """Duplicate batch: A is held before committing Dazu's batch; the same batch sent to B
    waits for A's lock, then is answered with A's acknowledgement, not INTERNAL."""
    r = replicas
    release = await r.start_both(pause_a="home_before_commit")
    card = senior(r)[0]
    await r.ride(DAZU, card, "dup-1", now - timedelta(seconds=40))
    dazu = asyncio.ensure_future(r.close(DAZU))
    await reached(release)
    cfg = r.setups[DAZU].config
    to_b = to(cfg.peers, r.b_listen)
    period = shanghai_day(now)
    async with open_sender(replace(cfg, peers=to_b)) as sender:
        again = asyncio.ensure_future(sender.send(ANYUE, period, 1))
        await first_done_or(again, lambda: r.lock_waited_for(ANYUE, f"verify/{ANYUE}"))
        release.touch()
        result = await again  # PeerUnavailable (INTERNAL) without the fix
    assert (await dazu)[:2] == (0, "")
    assert (result.lines, result.rejected, result.cap_exceeded) == (1, 0, 0)
    stored = r.sql(ANYUE, "SELECT sender, seq, ack FROM in_batches")
    assert [(s, q) for s, q, _ in stored] == [(DAZU, 1)]
    assert r.sql(DAZU, "SELECT state, ack FROM out_batches") == [("acked", stored[0][2])]


async def test_a_trip_committed_after_a_higher_one_still_counts_against_the_caps(
    replicas: Replicas, now: datetime
):
    """Watermark: an own trip that took its number before a higher one but commits after it
    (a replica's trip write in flight, here the test's open transaction) is not skipped: the
    verification reads the ledger's top under the close's lock, which waits for it."""
    r = replicas
    await r.start_both()
    card, other = senior(r)[:2]
    await r.ride(ANYUE, card, "own-1", now - timedelta(seconds=60))
    cols = [
        c
        for (c,) in r.sql(
            ANYUE,
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'trips' AND column_name <> 'ingest_seq' ORDER BY ordinal_position",
            (r.schema(ANYUE),),
        )
    ]
    picked = ", ".join("'own-2'" if c == "trip_id" else c for c in cols)
    with psycopg.connect(r.url) as writer:  # a trip write in flight: numbered, not committed
        writer.execute(f"SET search_path TO {r.schema(ANYUE)}")
        writer.execute(
            f"INSERT INTO trips ({', '.join(cols)}) SELECT {picked} FROM trips "
            "WHERE trip_id = 'own-1'"
        )
        await r.ride(ANYUE, other, "own-3", now - timedelta(seconds=50))  # numbered after it
        await r.ride(DAZU, other, "wm-d", now - timedelta(seconds=40))
        dazu = asyncio.ensure_future(r.close(DAZU))  # replica A syncs the own usage
        trips = f"{r.schema(ANYUE)}.trips"
        await first_done_or(
            dazu,
            lambda: bool(
                r.sql(
                    ANYUE,
                    "SELECT 1 FROM pg_locks WHERE locktype = 'relation' AND NOT granted "
                    "AND relation = %s::regclass",
                    (trips,),
                )
            ),
        )
        writer.commit()
    assert (await dazu)[:2] == (0, "")
    await r.ride(RONGCHANG, card, "wm-r", now - timedelta(seconds=20))
    assert (await r.close(RONGCHANG))[:2] == (0, "")  # replica B syncs again from the mark
    sources = {s for (s,) in r.sql(ANYUE, "SELECT source FROM cap_usage")}
    op = r.setups[ANYUE].operator_id
    assert {f"{ANYUE}|{op}|own-{i}" for i in (1, 2, 3)} <= sources


@pytest.mark.parametrize("replicas", ["postgres", "sqlite"], indirect=True)
async def test_a_second_close_of_the_same_period_says_which_runs_and_waits_for_it(
    replicas: Replicas, now: datetime
):
    """Close: the first close is held after planning; a second of the same day says which
    close is running and waits; once the first has sent, the second finds nothing to send.
    (SQLite: a lock on a file beside the clearing tables, for closes on one host.)"""
    r = replicas
    await r.start_both()
    await r.ride(DAZU, senior(r)[0], "close-1", now - timedelta(seconds=40))
    release = r.tmp / "release-close"
    first = asyncio.ensure_future(r.close(DAZU, "close_planned", release))
    await reached(release)
    day = shanghai_day(now).isoformat()
    log = r.tmp / "second-close.log"
    second = asyncio.ensure_future(r.close(DAZU, log=log))

    def waiting() -> bool:
        if r.url:
            return r.lock_waited_for(DAZU, f"close/{day}")
        return "close_waiting" in read(log)  # said so, then waits

    ended = await first_done_or(second, waiting)
    assert not ended, await second  # without the lock it sent the first's batch itself
    release.touch()
    (code1, err1, pid1), (code2, err2, _) = await first, await second
    assert (code1, err1, code2) == (0, "", 0)
    assert "close_waiting" in err2, err2
    if r.url:
        assert f"yikatong close/{day} (pid {pid1} on" in err2, err2
    assert r.sql(ANYUE, "SELECT sender, seq FROM in_batches") == [(DAZU, 1)]
    assert r.sql(DAZU, "SELECT seq, state FROM out_batches") == [(1, "acked")]
