"""Districts that clear with each other on disk, and an exchange between them without a network.

Shared by the unit tests of ``broker/settlement/clearing``. Each :class:`District`
has a SQLite ledger and clearing store under ``tmp_path`` (or, with ``ledger_url``,
a PostgreSQL schema of its own, dropped on close), a registry holding the
same kinds of card (:data:`KINDS`), an Ed25519 settlement key, the testbed's
sample fare rules and the sample agreement with every other district.
:class:`Loopback` stands in for a ``grpc.aio`` channel: a :class:`Sender`'s stub
calls go straight to the home district's :class:`Receiver`, passed on the way the
node's servicer does it (the caller is the sending district). Every date is fixed,
so nothing depends on the day the tests run.

The amounts and claims here are written out by hand from ``SAMPLE_FARES`` and
``SAMPLE_AGREEMENT`` (collected through home; shares 100 % senior free, 50 % senior
half, 33.33 % student), not computed with the broker's functions.
"""

from __future__ import annotations

import secrets
import tomllib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker._proto.yikatong.v1 import settlement_pb2
from broker.cards.config import PrivacyConfig, RegistryConfig
from broker.cards.csv_import import CardRow
from broker.cards.model import CardRef, Entitlement, Scene
from broker.cards.registry import Registry
from broker.core.db import Db
from broker.core.signing import PublicKey, Purpose, Signed, Signer
from broker.fares.agreements import Agreement
from broker.fares.rules import FareSchedule, parse_fares
from broker.node.config import NodeConfig
from broker.settlement.clearing.batch import Digest, Line, Spool, Totals, chunked
from broker.settlement.clearing.receiver import Receiver
from broker.settlement.clearing.sender import Sender
from broker.settlement.clearing.store import ClearingStore
from broker.settlement.config import LedgerConfig
from broker.settlement.ledger import Ledger, open_ledger
from broker.settlement.trips import ACCEPT, Trip
from broker.settlement.wire import signed_from_wire, signed_to_wire
from broker.testbed.build import SAMPLE_AGREEMENT, SAMPLE_FARES
from broker.trust.config import PeerConfig, TLSConfig, node_server_name

T = TypeVar("T", Registry, Ledger, ClearingStore)

SERVING, HOME, THIRD = "500111", "512021", "500153"  # Dazu, Anyue, Rongchang
OPERATOR = "transit-01"
DAY = date(2026, 3, 10)
AT = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai, on DAY
NOW = datetime(2026, 3, 11, 1, 0, tzinfo=UTC)  # every clock: the next morning
# DAY's late window closes at 2026-03-14 00:05 in Shanghai (its end + 72 h + 5 min):
# a close after that seals the day, and only then may it be confirmed.
SETTLE_AT = datetime(2026, 3, 13, 16, 10, tzinfo=UTC)
ISSUED = datetime(2026, 1, 1, tzinfo=UTC)  # when the registries learnt of their cards
# The sample rules with tight caps: free senior bus rides 2 a month and 3 a year,
# half-fare senior bus rides 1 a month.
CAPPED_FARES = SAMPLE_FARES.replace(
    "per_month = 60\nper_year = 1200",
    'per_month = 2\nper_year = 3\n\n[[table.scheme]]\nname = "senior-bus-half"\nper_month = 1',
)
assert CAPPED_FARES != SAMPLE_FARES


@dataclass(frozen=True)
class Kind:
    """A kind of card-holder every district's registry holds one of."""

    number: int
    holder: str
    born: date
    status: str = "active"
    disabled: bool = False
    student: bool = False
    valid_until: date = date(2030, 12, 31)


KINDS = {
    "plain": Kind(1, "h-plain", date(1990, 5, 5)),  # no entitlement
    "senior": Kind(2, "h-senior", date(1950, 1, 1)),  # 76 on DAY: senior 60, 65 and 70
    "senior_reissued": Kind(3, "h-senior", date(1950, 1, 1)),  # the same holder, a new card
    "student": Kind(4, "h-student", date(2008, 6, 1), student=True),
    "lost": Kind(5, "h-lost", date(1980, 1, 1), status="lost"),
    "expired": Kind(6, "h-expired", date(1980, 1, 1), valid_until=date(2026, 3, 9)),
    "turns65": Kind(7, "h-turns65", date(1961, 3, 11)),  # 64 on DAY, 65 the day after
}

# (scene, applied entitlement) → (gross, charged, concession, scheme) under SAMPLE_FARES.
PRICES: dict[tuple[Scene, Entitlement | None], tuple[int, int, int, str]] = {
    (Scene.BUS, None): (200, 200, 0, ""),
    (Scene.BUS, Entitlement.SENIOR_65): (200, 0, 200, "senior-bus-free"),
    (Scene.BUS, Entitlement.SENIOR_60): (200, 100, 100, "senior-bus-half"),
    (Scene.BUS, Entitlement.STUDENT): (200, 100, 100, "student-bus"),
    (Scene.SCENIC_AREA, None): (11500, 11500, 0, ""),
    (Scene.SCENIC_AREA, Entitlement.SENIOR_60): (11500, 5750, 5750, "scenic-senior"),
}
# The same under SAMPLE_AGREEMENT: charged + concession × share, half up, by hand.
CLAIMS: dict[tuple[Scene, Entitlement | None], int] = {
    (Scene.BUS, None): 200,
    (Scene.BUS, Entitlement.SENIOR_65): 200,  # 0 + 200 × 100 %
    (Scene.BUS, Entitlement.SENIOR_60): 150,  # 100 + 100 × 50 %
    (Scene.BUS, Entitlement.STUDENT): 133,  # 100 + 100 × 33.33 % = 133.33
    (Scene.SCENIC_AREA, None): 11500,
    (Scene.SCENIC_AREA, Entitlement.SENIOR_60): 8625,  # 5750 + 5750 × 50 %
}


def card(district: str, kind: str) -> CardRef:
    return CardRef(district, f"C{district}{KINDS[kind].number:07d}")


def trip(
    ref: CardRef,
    trip_id: str,
    entitlement: Entitlement | None = None,
    *,
    scene: Scene = Scene.BUS,
    at: datetime = AT,
    version: str = "sample-1",
    operator: str = OPERATOR,
) -> Trip:
    """A trip priced as the sample rules price it (amounts from :data:`PRICES`)."""
    gross, charged, concession, _ = PRICES[(scene, entitlement)]
    return Trip(
        operator, trip_id, ref, scene, "", at, gross, charged, concession, entitlement, version
    )


def line(t: Trip, claimed: int | None = None, scheme: str | None = None) -> Line:
    """A batch line for ``t`` with its scheme and claim as the sample terms give (or as given)."""
    key = (t.scene, t.applied_entitlement)
    return Line(
        t,
        PRICES[key][3] if scheme is None else scheme,
        CLAIMS[key] if claimed is None else claimed,
    )


def sample_fares(district: str, text: str = SAMPLE_FARES) -> FareSchedule:
    return parse_fares(tomllib.loads(f'district = "{district}"\n' + text))


def registry_rows(district: str) -> list[CardRow]:
    return [
        CardRow(
            card(district, name).card_number,
            k.holder,
            k.born,
            k.status,
            k.disabled,
            k.student,
            k.valid_until,
        )
        for name, k in KINDS.items()
    ]


class District:
    """One district's clearing material on disk, each part opened when first used."""

    def __init__(
        self, root: Path, code: str, peers: Iterable[str], ledger_url: str | None = None
    ) -> None:
        peers = list(peers)
        # SQLite files under root, or a PostgreSQL schema of this district's own.
        ledger = (
            LedgerConfig(url=ledger_url, schema=f"ykc_{secrets.token_hex(4)}_{code}")
            if ledger_url
            else LedgerConfig(path=root / "ledger.sqlite3")
        )
        self.code = code
        self.signer = Signer(ed25519.Ed25519PrivateKey.generate())
        self.fares = sample_fares(code)
        self.cfg = NodeConfig(
            district=code,
            listen="127.0.0.1:0",
            tls=TLSConfig(
                root / "ca.pem", root / "node.pem", root / "node.key", root / "crl.pem"
            ),  # never read
            registry=RegistryConfig(root / "registry.sqlite3"),
            privacy=PrivacyConfig(root / "hash.key"),
            peers=tuple(PeerConfig(p, "127.0.0.1:9", None, node_server_name(p)) for p in peers),
            ledger=ledger,
            agreements=tuple(Agreement(p, **SAMPLE_AGREEMENT) for p in peers),
        )
        self._opened: list[Registry | Ledger | ClearingStore] = []

    def _open(self, thing: T) -> T:
        self._opened.append(thing)
        return thing

    @cached_property
    def registry(self) -> Registry:
        registry = Registry(self.cfg.registry)
        registry.upsert(registry_rows(self.code), ISSUED)
        return self._open(registry)

    @cached_property
    def ledger(self) -> Ledger:
        return self._open(
            open_ledger(self.cfg.ledger.path, self.cfg.ledger.url, self.cfg.ledger.schema)
        )

    @cached_property
    def store(self) -> ClearingStore:
        """The clearing store as ``broker settle`` opens it."""
        return self._open(ClearingStore.open(self.cfg))

    @cached_property
    def home_store(self) -> ClearingStore:
        """The clearing store as the node opens it: a connection of its own."""
        return self._open(ClearingStore.open(self.cfg))

    def record(self, *trips: Trip) -> None:
        """Trips this district's operators submitted, accepted into its ledger."""
        self.ledger.record([(t, ACCEPT) for t in trips], NOW)

    def close(self) -> None:
        for thing in reversed(self._opened):
            thing.close()
        if self.cfg.ledger.url:
            db = Db.postgres(self.cfg.ledger.url, self.cfg.ledger.schema)
            db.execute(f"DROP SCHEMA IF EXISTS {self.cfg.ledger.schema} CASCADE")
            db.close()


class Loopback:
    """A ``grpc.aio`` channel from ``caller`` whose Settlement calls reach ``receiver`` directly.

    ``down`` makes every call fail as an unreachable peer does; ``alter_ack``
    changes the acknowledgement on its way back (a home district misbehaving).
    """

    def __init__(
        self,
        caller: str,
        receiver: Receiver,
        down: bool = False,
        alter_ack: Callable[[Signed], Signed] | None = None,
    ) -> None:
        self.caller = caller
        self.receiver = receiver
        self.down = down
        self.alter_ack = alter_ack
        self.calls: list[str] = []

    def _fail(self) -> None:
        if self.down:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "connection refused",
            )

    def unary_unary(self, method: str, **_: Any) -> Callable[..., Any]:
        name = method.rsplit("/", 1)[-1]

        async def call(request: settlement_pb2.SignedDocument, **_: Any) -> Any:
            self.calls.append(name)
            self._fail()
            signed = signed_from_wire(request)
            if name == "PublishFares":
                versions = self.receiver.publish_fares(self.caller, signed)
                return settlement_pb2.PublishFaresResponse(versions=versions)
            assert name == "ConfirmDay", name
            return signed_to_wire(self.receiver.confirm(self.caller, signed))

        return call

    def stream_stream(self, method: str, **_: Any) -> Callable[..., Any]:
        name = method.rsplit("/", 1)[-1]
        assert name == "ExchangeBatch", name

        def call(
            parts: AsyncIterator[settlement_pb2.BatchPart], **_: Any
        ) -> AsyncIterator[settlement_pb2.AckPart]:
            self.calls.append(name)
            return self._exchange(parts)

        return call

    async def _exchange(
        self, parts: AsyncIterator[settlement_pb2.BatchPart]
    ) -> AsyncIterator[settlement_pb2.AckPart]:
        self._fail()
        spool = Spool()
        try:
            trailer = None
            async for part in parts:
                if part.HasField("trailer"):
                    trailer = signed_from_wire(part.trailer)
                else:
                    spool.add(part.lines)
            assert trailer is not None
            ack = self.receiver.receive(self.caller, spool, trailer)
        finally:
            spool.close()
        for chunk in ack.chunks:
            yield settlement_pb2.AckPart(verdicts=chunk)
        signed = self.alter_ack(ack.signed) if self.alter_ack else ack.signed
        yield settlement_pb2.AckPart(ack=signed_to_wire(signed))


class World:
    """Districts peered with each other, each with a Receiver; Senders talk over Loopbacks."""

    def __init__(
        self, root: Path, codes: Iterable[str] = (SERVING, HOME), ledger_url: str | None = None
    ) -> None:
        codes = list(codes)
        self.districts = {
            c: District(root / c, c, [o for o in codes if o != c], ledger_url) for c in codes
        }
        self._receivers: dict[str, Receiver] = {}
        self.down: set[str] = set()
        self.alter_ack: dict[str, Callable[[Signed], Signed]] = {}
        self.channels: list[Loopback] = []
        self.spools: list[Spool] = []
        self.now = NOW  # every district's clock; a test moves it on

    def clock(self) -> datetime:
        return self.now

    def __getitem__(self, code: str) -> District:
        return self.districts[code]

    def keys(self, district: str) -> Mapping[str, PublicKey]:
        """What each district's trust bundle says its settlement keys are."""
        d = self.districts.get(district)
        return d.signer.public_keys() if d else {}

    def receiver(self, code: str) -> Receiver:
        """The node-side Receiver of ``code`` (one per district)."""
        if code in self._receivers:
            return self._receivers[code]
        d = self.districts[code]
        rx = self._receivers[code] = Receiver(
            code,
            d.home_store,
            d.signer,
            d.registry,
            self.keys,
            d.cfg.agreement,
            d.fares,
            self.clock,
        )
        return rx

    def sender(self, code: str) -> Sender:
        d = self.districts[code]

        def channel(home: str) -> Loopback:
            ch = Loopback(code, self.receiver(home), home in self.down, self.alter_ack.get(home))
            self.channels.append(ch)
            return ch

        return Sender(d.cfg, d.store, d.signer, d.fares, channel, self.keys, self.clock)

    def batch(
        self, lines: list[Line], signer: Signer | None = None, **header: Any
    ) -> tuple[Spool, Signed]:
        """:func:`signed_batch` (by SERVING unless told), its spool closed with the world."""
        spool, trailer = signed_batch(signer or self.districts[SERVING].signer, lines, **header)
        self.spools.append(spool)
        return spool, trailer

    def spool(self, *chunks: bytes) -> Spool:
        """Chunks as received (closed with the world)."""
        spool = Spool()
        for c in chunks:
            spool.add(c)
        self.spools.append(spool)
        return spool

    def close(self) -> None:
        for s in self.spools:
            s.close()
        for d in self.districts.values():
            d.close()


def signed_batch(
    signer: Signer,
    lines: list[Line],
    *,
    frm: str = SERVING,
    to: str = HOME,
    period: date = DAY,
    seq: int = 1,
    kind: str = "close",
    overrides: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
) -> tuple[Spool, Signed]:
    """A batch as a sender streams it: its chunks spooled, and its signed trailer.

    ``overrides`` replace fields of the signed header and ``drop`` removes some (to make it lie).
    """
    spool, digest, totals = Spool(), Digest(), Totals()
    for chunk, _ in chunked(lines):
        spool.add(chunk)
        digest.update(chunk)
    for x in lines:
        totals.add(x)
    header = {
        "type": "batch",
        "from": frm,
        "to": to,
        "period": period.isoformat(),
        "sequence": seq,
        "kind": kind,
        "created_at": NOW.isoformat(),
        **totals.as_doc(),
        "digest": digest.hexdigest(),
        "chunks": digest.chunks,
        **(overrides or {}),
    }
    for name in drop:
        del header[name]
    return spool, signer.sign(header, Purpose.BATCH)


def backend_url(request: pytest.FixtureRequest) -> str | None:
    """For a fixture parametrized ``["sqlite", "postgres"]``: the PostgreSQL URL, or None."""
    return str(request.getfixturevalue("postgres_url")) if request.param == "postgres" else None
