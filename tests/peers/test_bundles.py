"""Keeping a peer's trust bundle: the one gate a bundle passes (accept) and the refresher.

Module under test: :mod:`broker.peers.bundles`. tests/trust/test_bundle.py covers bundles made
by the certificate store (publishing, a whole CA rotation, the CLI); here bundles are signed
by hand so that each rule of :func:`accept` is met or broken exactly once, and the refresher
fetches from a stand-in peer on loopback (tests/peers/support.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import broker.peers.bundles as bundles_module
from broker.peers.bundles import BundleRefresher, accept, held_bundle
from broker.peers.channels import PeerChannels
from broker.trust import pki
from broker.trust.bundle import Bundle, BundleRefused, SignedBundle, issued_now, sign
from broker.trust.config import PeerConfig, TLSConfig, node_server_name
from broker.trust.store import TrustStore
from tests.peers.support import HOME, PEER, District, PeerServer, Settings, home_settings
from tests.trust.test_revocation import ca_without_ski, hand_built


def bundle(now: datetime, sequence: int, *cas: pki.KeyPair, district: str = PEER) -> Bundle:
    return Bundle(
        district=district,
        sequence=sequence,
        issued_at=issued_now(now),
        cas_pem=tuple(ca.cert_pem().decode() for ca in cas),
        # Every CA's revocation list, numbered as the bundle so numbers only grow.
        crls_pem=tuple(
            pki.crl_pem(pki.build_crl(ca, [], max(sequence, 0), now)).decode() for ca in cas
        ),
        settlement_keys=(),
    )


def signed(now: datetime, sequence: int, signer: pki.KeyPair, *cas: pki.KeyPair) -> SignedBundle:
    """Bundle ``sequence`` listing ``cas`` (default: the signer), signed by ``signer``."""
    return sign(bundle(now, sequence, *(cas or (signer,))), signer)


def peer_config(tmp_path: Path, bundle_file: bool = True) -> PeerConfig:
    return PeerConfig(
        PEER,
        "127.0.0.1:1",
        None,
        node_server_name(PEER),
        bundle_file=tmp_path / "held" / f"{PEER}.bundle.json" if bundle_file else None,
    )


@pytest.fixture
def ca(now: datetime) -> pki.KeyPair:
    return pki.create_ca(PEER, now)


@pytest.fixture
def peer(tmp_path: Path, ca: pki.KeyPair, now: datetime) -> PeerConfig:
    """A peer whose first bundle (sequence 1, signed by ``ca``) is held."""
    p = peer_config(tmp_path)
    accept(p, signed(now, 1, ca), first_use=True)
    return p


def held_bytes(p: PeerConfig) -> bytes:
    assert p.bundle_file is not None
    return p.bundle_file.read_bytes()


# ----------------------------------------------------------------------------- held_bundle


def test_nothing_is_held_without_a_bundle_file_or_before_the_first_import(tmp_path: Path):
    assert held_bundle(peer_config(tmp_path, bundle_file=False)) is None
    assert held_bundle(peer_config(tmp_path)) is None


def test_held_bundle_reads_back_what_accept_stored(peer: PeerConfig, ca: pki.KeyPair):
    held = held_bundle(peer)
    assert held is not None
    assert (held.district, held.sequence) == (PEER, 1)
    assert [c.subject for c in held.cas()] == [ca.cert.subject]


def test_a_garbled_held_file_is_refused_not_read_as_nothing(peer: PeerConfig, now, ca):
    """A damaged file must not pass for "nothing held", which would let a first use in."""
    assert peer.bundle_file is not None
    peer.bundle_file.write_bytes(b"{ not json")
    with pytest.raises(BundleRefused, match="malformed"):
        held_bundle(peer)
    with pytest.raises(BundleRefused):
        accept(peer, signed(now, 2, ca), first_use=True)
    assert peer.bundle_file.read_bytes() == b"{ not json"


# ----------------------------------------------------------------------------- first use


def test_a_peer_without_a_bundle_file_is_refused(tmp_path: Path, ca, now):
    for first_use in (False, True):
        with pytest.raises(BundleRefused, match="no bundle_file configured"):
            accept(peer_config(tmp_path, bundle_file=False), signed(now, 1, ca), first_use)


def test_without_first_use_nothing_held_means_refused_and_nothing_written(tmp_path, ca, now):
    p = peer_config(tmp_path)
    with pytest.raises(BundleRefused, match="import the first one by hand"):
        accept(p, signed(now, 1, ca))
    assert p.bundle_file is not None and not p.bundle_file.exists()


def test_first_use_stores_the_signed_bundle_as_sent(tmp_path: Path, ca, now):
    p = peer_config(tmp_path)
    first = signed(now, 1, ca)
    got = accept(p, first, first_use=True)
    assert got == Bundle.parse(first.document)
    assert held_bytes(p) == first.to_json()  # the signature is kept, so it can be re-checked
    assert SignedBundle.from_json(held_bytes(p)) == first


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other district", "not 512021"),
        ("signer not listed", "not trusted"),
        ("bad signature", "signature does not verify"),
        ("sequence 0", "not above"),
    ],
)
def test_first_use_still_checks_the_bundle_against_itself(
    tmp_path: Path, ca: pki.KeyPair, now: datetime, case: str, message: str
):
    other = pki.create_ca(PEER, now)
    offered = {
        "other district": sign(bundle(now, 1, ca, district=HOME), ca),
        "signer not listed": signed(now, 1, other, ca),
        "bad signature": SignedBundle(
            signed(now, 1, ca).document, pki.ca_id(ca.cert), b"\x30\x06\x02\x01\x01\x02\x01\x01"
        ),
        "sequence 0": signed(now, 0, ca),
    }[case]
    p = peer_config(tmp_path)
    with pytest.raises(BundleRefused, match=message):
        accept(p, offered, first_use=True)
    assert p.bundle_file is not None and not p.bundle_file.exists()


# ----------------------------------------------------------------------------- next bundles


def test_a_higher_sequence_signed_by_the_held_ca_replaces_the_held_one(peer, ca, now):
    nxt = signed(now, 2, ca)
    got = accept(peer, nxt)
    assert got is not None and got.sequence == 2
    assert held_bytes(peer) == nxt.to_json()


def test_sequences_may_skip_numbers(peer, ca, now):
    got = accept(peer, signed(now, 7, ca))
    assert got is not None and got.sequence == 7


def test_the_same_bundle_again_is_nothing_to_do_and_leaves_the_file_alone(peer, ca, now):
    before = held_bytes(peer)
    assert peer.bundle_file is not None
    stamp = peer.bundle_file.stat().st_mtime_ns
    held = held_bundle(peer)
    assert held is not None
    # ECDSA signatures differ each time: the same document signed again is still "the same".
    again = sign(held, ca)
    assert again.signature != SignedBundle.from_json(before).signature
    assert accept(peer, again) is None
    assert held_bytes(peer) == before and peer.bundle_file.stat().st_mtime_ns == stamp


def test_the_held_sequence_with_other_content_is_refused(peer, ca, now):
    other = pki.create_ca(PEER, now)
    before = held_bytes(peer)
    with pytest.raises(BundleRefused, match="sequence 1 reused with other content"):
        accept(peer, signed(now, 1, ca, ca, other))
    assert held_bytes(peer) == before


def test_a_lower_sequence_is_refused_and_the_held_one_kept(peer, ca, now):
    accept(peer, signed(now, 5, ca))
    before = held_bytes(peer)
    for sequence in (4, 2, 0, -1):
        with pytest.raises(BundleRefused, match="not above the held 5"):
            accept(peer, signed(now, sequence, ca))
    assert held_bytes(peer) == before


def test_a_bundle_signed_by_a_ca_not_held_is_refused_even_listing_that_ca(peer, now):
    """A rogue CA naming itself in the bundle it signs must not be trusted for that."""
    rogue = pki.create_ca(PEER, now)
    before = held_bytes(peer)
    with pytest.raises(BundleRefused, match="not trusted"):
        accept(peer, signed(now, 2, rogue))
    assert held_bytes(peer) == before


def test_first_use_does_not_bypass_a_held_bundle(peer, now):
    """Once something is held, first_use must not let a foreign CA take over."""
    rogue = pki.create_ca(PEER, now)
    with pytest.raises(BundleRefused, match="not trusted"):
        accept(peer, signed(now, 2, rogue), first_use=True)
    held = held_bundle(peer)
    assert held is not None and held.sequence == 1


def test_a_tampered_document_is_refused(peer, ca, now):
    good = signed(now, 2, ca)
    tampered = SignedBundle(
        good.document.replace(b'"sequence":2', b'"sequence":3'), good.signer, good.signature
    )
    with pytest.raises(BundleRefused, match="signature"):
        accept(peer, tampered)


def test_a_malformed_document_is_refused(peer, ca):
    for document in (b"", b"[]", b'{"district": "512021"}', b"\xff\xfe"):
        with pytest.raises(BundleRefused, match="malformed"):
            accept(peer, SignedBundle(document, pki.ca_id(ca.cert), b"sig"))


def test_a_retired_ca_can_sign_no_more_bundles(peer, ca, now):
    """Rotation: old signs [old, new]; new signs [new]; from then on the old one is refused."""
    new = pki.create_ca(PEER, now)
    assert accept(peer, signed(now, 2, ca, ca, new)) is not None
    assert accept(peer, signed(now, 3, new, new)) is not None
    with pytest.raises(BundleRefused, match="not trusted"):
        accept(peer, signed(now, 4, ca, ca, new))
    held = held_bundle(peer)
    assert held is not None and held.sequence == 3


# ----------------------------------------------------------------------------- the refresher


@dataclass
class Refreshing:
    server: PeerServer
    peer: PeerConfig
    ca: pki.KeyPair
    refresher: BundleRefresher
    changes: list[int]


@pytest.fixture
async def refreshing(tmp_path: Path, now: datetime) -> AsyncIterator[Refreshing]:
    """Home holding PEER's first bundle, and a PEER node serving bundles on loopback."""
    home, peer = District.make(HOME, now), District.make(PEER, now)
    server = await PeerServer.start(peer.node, home.ca)
    settings = home_settings(tmp_path, home, {PEER: (peer, server.address)}, bundles=True)
    (p,) = settings.peers
    accept(p, signed(now, 1, peer.ca), first_use=True)
    store = TrustStore(settings)
    channels = PeerChannels(store, settings.peers)
    changes: list[int] = []
    refresher = BundleRefresher(settings, channels, store, lambda: changes.append(1))
    try:
        yield Refreshing(server, p, peer.ca, refresher, changes)
    finally:
        await channels.close()
        await server.stop()


async def test_refresh_stores_a_newer_bundle_and_reports_the_change(refreshing: Refreshing, now):
    newer = signed(now, 2, refreshing.ca)
    refreshing.server.trust.bundle = newer
    assert await refreshing.refresher.refresh(refreshing.peer) is True
    assert held_bytes(refreshing.peer) == newer.to_json()
    assert refreshing.changes == [1]


async def test_refresh_of_the_bundle_already_held_changes_nothing(refreshing: Refreshing, now):
    before = held_bytes(refreshing.peer)
    refreshing.server.trust.bundle = SignedBundle.from_json(before)
    assert await refreshing.refresher.refresh(refreshing.peer) is False
    assert held_bytes(refreshing.peer) == before and refreshing.changes == []


@pytest.mark.parametrize("served", ["stale", "forged", "none"])
async def test_refresh_keeps_the_held_bundle_when_the_peer_serves_no_good_one(
    refreshing: Refreshing, now: datetime, served: str
):
    accept(refreshing.peer, signed(now, 3, refreshing.ca))
    before = held_bytes(refreshing.peer)
    refreshing.server.trust.bundle = {
        "stale": signed(now, 2, refreshing.ca),
        "forged": signed(now, 9, pki.create_ca(PEER, now)),
        "none": None,  # the peer answers an error status
    }[served]
    assert await refreshing.refresher.refresh(refreshing.peer) is False
    assert refreshing.server.trust.calls == 1
    assert held_bytes(refreshing.peer) == before and refreshing.changes == []


class Clock:
    """Stands in for the ``time`` module the refresher reads; the event loop keeps the real one."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    c = Clock()
    monkeypatch.setattr(bundles_module, "time", c)
    yield c


async def test_poke_wakes_the_refresher_at_most_once_every_5_s(tmp_path: Path, clock: Clock):
    rounds: list[str] = []
    round_done = asyncio.Event()

    class Counting(BundleRefresher):
        async def refresh(self, peer: PeerConfig) -> bool:
            rounds.append(peer.district)
            round_done.set()
            return False

    no_bundle = PeerConfig("500153", "127.0.0.1:1", tmp_path / "ca.pem", node_server_name("500153"))
    tls = TLSConfig(
        tmp_path / "ca.pem", tmp_path / "node.pem", tmp_path / "node.key", tmp_path / "crl.pem"
    )
    settings = Settings(HOME, tls, (no_bundle, peer_config(tmp_path)))
    # Channels and store are only handed to refresh(), which this test replaces.
    refresher = Counting(settings, None, None, lambda: None)  # type: ignore[arg-type]

    async def next_round(within_s: float = 5.0) -> bool:
        round_done.clear()
        try:
            await asyncio.wait_for(round_done.wait(), within_s)
        except TimeoutError:
            return False
        return True

    task = asyncio.create_task(refresher.run())
    try:
        assert await next_round()  # a first round at once
        refresher.poke()
        assert await next_round()  # poked: a round long before the 30 s interval
        clock.now += 4.9
        refresher.poke()
        assert not await next_round(0.3)  # too soon after the last early round
        clock.now += 0.1
        refresher.poke()
        assert await next_round()  # 5 s on: early again
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rounds == [PEER, PEER, PEER]  # the peer without a bundle_file is never asked


# ----------------------------------------------------------------------------- usable bundles
# accept() applies every check the trust store applies when it loads the file, before writing:
# a bundle stored that a reload then refuses would leave the peer without trust (issue 10, item 4).


def without_aki(now: datetime, sequence: int, ca: pki.KeyPair) -> SignedBundle:
    """Bundle ``sequence`` of ``ca``, properly signed by it, whose list lacks the AKI."""
    no_aki = hand_built(ca, now, aki=False, number=sequence).decode()
    doc = dataclasses.replace(bundle(now, sequence, ca), crls_pem=(no_aki,))
    return sign(doc, ca)


def assert_kept(p: PeerConfig, before: bytes, sequence: int) -> None:
    assert held_bytes(p) == before
    held = held_bundle(p)
    assert held is not None and held.sequence == sequence


def test_a_signed_bundle_whose_list_lacks_the_authority_key_id_is_refused(peer, ca, now):
    before = held_bytes(peer)
    with pytest.raises(BundleRefused, match=r"not usable: .*lacks its authorityKeyIdentifier"):
        accept(peer, without_aki(now, 2, ca))
    assert_kept(peer, before, 1)
    # The held bundle still loads: the peer stays trusted.
    store = TrustStore(home_settings_for(peer, now))
    assert store.current.trusted(PEER) and PEER not in store.current.problems


def test_a_first_bundle_whose_list_lacks_the_authority_key_id_is_not_imported(tmp_path, ca, now):
    p = peer_config(tmp_path)
    with pytest.raises(BundleRefused, match="lacks its authorityKeyIdentifier"):
        accept(p, without_aki(now, 1, ca), first_use=True)
    assert p.bundle_file is not None and not p.bundle_file.exists()


def test_a_signed_bundle_adding_a_ca_without_a_subject_key_id_is_refused(peer, ca, now):
    """Signed by the held CA (a rotation's publish stage), but the new CA has no key id."""
    before = held_bytes(peer)
    with pytest.raises(BundleRefused, match=r"not usable: .*has no Subject Key Identifier"):
        accept(peer, signed(now, 2, ca, ca, ca_without_ski(PEER, now)))
    assert_kept(peer, before, 1)


def test_a_first_bundle_listing_a_ca_without_a_subject_key_id_is_not_imported(tmp_path, ca, now):
    p = peer_config(tmp_path)
    with pytest.raises(BundleRefused, match="Subject Key Identifier"):
        accept(p, signed(now, 1, ca, ca, ca_without_ski(PEER, now)), first_use=True)
    assert p.bundle_file is not None and not p.bundle_file.exists()


def test_a_bundle_older_than_the_hard_age_limit_is_refused(peer, ca, now):
    """A correctly signed, higher bundle that someone kept back for 8 days (the limit: 7)."""
    before = held_bytes(peer)
    with pytest.raises(BundleRefused, match=r"older than trust\.bundle_hard_age_s"):
        accept(peer, signed(now - timedelta(days=8), 2, ca))
    assert_kept(peer, before, 1)


def test_the_hard_age_limit_is_the_one_configured(peer, ca, now):
    two_minutes_old = signed(now - timedelta(minutes=2), 2, ca)
    before = held_bytes(peer)
    with pytest.raises(BundleRefused, match=r"older than trust\.bundle_hard_age_s \(60 s\)"):
        accept(peer, two_minutes_old, now=now, hard_age_s=60)
    assert_kept(peer, before, 1)
    got = accept(peer, two_minutes_old, now=now, hard_age_s=3600)
    assert got is not None and got.sequence == 2
    assert held_bytes(peer) == two_minutes_old.to_json()


def home_settings_for(p: PeerConfig, now: datetime) -> Settings:
    """A home district whose only peer is ``p`` (its bundle already held)."""
    assert p.bundle_file is not None
    home = District.make(HOME, now)
    settings = home_settings(p.bundle_file.parent.parent / "home", home, {})
    return dataclasses.replace(settings, peers=(p,))


# ----------------------------------------------------------------------------- fetching health


@pytest.mark.parametrize("failure", ["peer answers an error", "bundle not usable"])
async def test_fetching_fails_after_three_failed_fetches_and_recovers_on_a_success(
    refreshing: Refreshing, now: datetime, failure: str
):
    r = refreshing
    unusable = without_aki(now, 2, r.ca)
    r.server.trust.bundle = None if failure == "peer answers an error" else unusable
    before = held_bytes(r.peer)
    for attempt in range(1, 4):
        assert r.refresher.fetching(PEER) is True, attempt
        assert await r.refresher.refresh(r.peer) is False
    assert r.server.trust.calls == 3
    assert r.refresher.fetching(PEER) is False
    assert held_bytes(r.peer) == before and r.changes == []

    newer = signed(now, 3, r.ca)
    r.server.trust.bundle = newer
    assert await r.refresher.refresh(r.peer) is True
    assert r.refresher.fetching(PEER) is True
    assert held_bytes(r.peer) == newer.to_json()


async def test_a_fetch_of_the_bundle_already_held_counts_as_a_success(refreshing: Refreshing):
    r = refreshing
    r.server.trust.bundle = None
    for _ in range(3):
        await r.refresher.refresh(r.peer)
    assert r.refresher.fetching(PEER) is False
    r.server.trust.bundle = SignedBundle.from_json(held_bytes(r.peer))
    assert await r.refresher.refresh(r.peer) is False  # nothing new, but the peer answered
    assert r.refresher.fetching(PEER) is True


def test_concurrent_accepts_never_leave_a_lower_sequence_over_a_higher_one(peer, ca, now):
    """The refresher and `broker trust import` at once: the lock makes check-and-write one step."""
    import threading

    bundles = [signed(now, n, ca) for n in range(2, 40)]  # the fixture holds sequence 1
    random.Random(7).shuffle(bundles)
    errors: list[BaseException] = []

    def take(b: SignedBundle) -> None:
        try:
            accept(peer, b)
        except BundleRefused:
            pass  # lower than one already held: refused, as it should be
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(b,)) for b in bundles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    held = held_bundle(peer)
    assert held is not None and held.sequence == 39


async def test_a_file_error_for_one_peer_does_not_stop_the_refresh_of_the_others(
    tmp_path: Path, now: datetime, monkeypatch: pytest.MonkeyPatch
):
    """Found by review: an OSError from storing one peer's bundle ended the whole round."""
    from broker.peers import bundles as module

    calls: list[str] = []

    def accept_failing_for_the_first(peer: PeerConfig, *args: object, **kwargs: object) -> None:
        calls.append(peer.district)
        if peer.district == "512021":
            raise PermissionError(13, "Permission denied")
        return None

    monkeypatch.setattr(module, "accept", accept_failing_for_the_first)

    class Stub:
        async def GetBundle(self, request: object, **kwargs: object) -> object:
            return trust_pb2.SignedTrustBundle(document=b"{}", signer="x", signature=b"s")

    class Channels:
        def channel(self, district: str) -> object:
            return object()

    from broker._proto.yikatong.v1 import trust_pb2, trust_pb2_grpc

    monkeypatch.setattr(trust_pb2_grpc, "TrustStub", lambda ch: Stub())
    first = PeerConfig("512021", "127.0.0.1:1", None, "n", bundle_file=tmp_path / "a.json")
    second = PeerConfig("500153", "127.0.0.1:2", None, "n", bundle_file=tmp_path / "b.json")
    refresher = module.BundleRefresher.__new__(module.BundleRefresher)
    refresher._channels = Channels()  # type: ignore[assignment]
    refresher._hard_age_s = 3600
    refresher._on_change = lambda: None
    refresher.failures = {}
    for peer in (first, second):
        await refresher.refresh(peer)
    assert calls == ["512021", "500153"]
    assert refresher.failures == {"512021": 1, "500153": 0}  # counted: it shows in health


async def test_a_poke_while_a_round_runs_starts_the_next_round_at_once() -> None:
    """A call to a peer that fails during a refresh round must not wait a whole interval."""
    import asyncio

    from broker.peers.bundles import BundleRefresher

    refresher = BundleRefresher.__new__(BundleRefresher)
    refresher._peers = [PeerConfig(PEER, "127.0.0.1:1", None, "n", bundle_file=Path("x"))]
    refresher._interval = 3600
    refresher._wake = asyncio.Event()
    refresher._last_early = -1e9
    rounds: list[int] = []

    async def refresh(peer: PeerConfig) -> bool:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            refresher.poke()  # arrives while the first round is still running
        return False

    refresher.refresh = refresh  # type: ignore[method-assign]
    task = asyncio.create_task(refresher.run())
    try:
        for _ in range(100):
            if len(rounds) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(rounds) >= 2, "the poke during the round was lost: next round in an hour"
    finally:
        task.cancel()
