"""Card references, scenes and recognition answers to and from the wire (yikatong.v1)."""

from __future__ import annotations

import enum

import pytest

from broker._proto.yikatong.v1 import recognition_pb2, types_pb2
from broker.cards.model import CardRef, CardStatus, Entitlement, Recognition, Scene
from broker.cards.wire import (
    card_from_wire,
    card_to_wire,
    recognition_from_wire,
    recognition_to_wire,
    scene_from_wire,
)
from broker.core.errors import InvalidArgument

NUMBER = "ABC123456"


def _wire_card(region: str = "500111", number: str = NUMBER) -> types_pb2.CardRef:
    return types_pb2.CardRef(issuer_region=region, card_number=number)


def _over_the_wire(msg: recognition_pb2.RecognizeResponse) -> recognition_pb2.RecognizeResponse:
    return recognition_pb2.RecognizeResponse.FromString(msg.SerializeToString())


@pytest.mark.parametrize(
    ("ours", "wire", "prefix"),
    [
        (Scene, types_pb2.Scene, "SCENE_"),
        (CardStatus, types_pb2.CardStatus, "CARD_STATUS_"),
        (Entitlement, types_pb2.Entitlement, "ENTITLEMENT_"),
    ],
)
def test_model_enums_have_the_wire_enums_values(ours: type[enum.IntEnum], wire, prefix):
    """The conversions pass enum values through, so every member must mean the same number."""
    for member in ours:
        assert wire.Value(prefix + member.name) == member.value
    # and every wire value besides UNSPECIFIED (0) has a model member
    assert {v for v in wire.values() if v != 0} <= {m.value for m in ours}


def test_a_card_survives_a_round_trip_through_bytes():
    ref = CardRef("500111", NUMBER)
    wire = types_pb2.CardRef.FromString(card_to_wire(ref).SerializeToString())
    assert card_from_wire(wire, present=True) == ref


def test_card_from_wire_returns_the_fields_it_was_given():
    assert card_from_wire(_wire_card("512021", "Z" * 20), True) == CardRef("512021", "Z" * 20)


def test_a_missing_card_is_refused_naming_the_card_field():
    with pytest.raises(InvalidArgument) as info:
        card_from_wire(types_pb2.CardRef(), present=False)
    assert info.value.field == "card"
    assert "required" in info.value.reason


def test_a_missing_card_is_refused_even_if_the_message_holds_values():
    """``present`` decides (HasField), not whether the default message looks filled in."""
    with pytest.raises(InvalidArgument) as info:
        card_from_wire(_wire_card(), present=False, prefix="trip.card")
    assert info.value.field == "trip.card"


def test_a_present_but_empty_card_is_refused_on_its_region():
    with pytest.raises(InvalidArgument) as info:
        card_from_wire(types_pb2.CardRef(), present=True)
    assert info.value.field == "card.issuer_region"


@pytest.mark.parametrize(
    ("region", "number", "field"),
    [
        ("50011", NUMBER, "card.issuer_region"),
        ("900000", NUMBER, "card.issuer_region"),
        ("500111", "abc123456", "card.card_number"),
        ("500111", "AB12", "card.card_number"),
        ("500111", "A" * 21, "card.card_number"),
        ("500111", "ABC 123456", "card.card_number"),
    ],
)
def test_a_bad_card_names_the_field_path_and_not_the_number(region, number, field):
    with pytest.raises(InvalidArgument) as info:
        card_from_wire(_wire_card(region, number), present=True)
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")
    assert number not in str(info.value)


def test_the_field_path_follows_the_prefix():
    with pytest.raises(InvalidArgument) as info:
        card_from_wire(_wire_card(number="bad"), present=True, prefix="trips[2].card")
    assert info.value.field == "trips[2].card.card_number"


@pytest.mark.parametrize("scene", [Scene.BUS, Scene.SCENIC_AREA, Scene.MUSEUM, Scene.LIBRARY])
def test_every_real_scene_is_read_as_itself(scene: Scene):
    wire_value = types_pb2.Scene.Value("SCENE_" + scene.name)
    got = scene_from_wire(wire_value)
    assert got is scene
    assert scene_from_wire(wire_value, required=False) is scene


def test_unspecified_scene_is_refused_when_required_and_accepted_when_optional():
    with pytest.raises(InvalidArgument) as info:
        scene_from_wire(types_pb2.SCENE_UNSPECIFIED)
    assert info.value.field == "scene"
    assert scene_from_wire(types_pb2.SCENE_UNSPECIFIED, required=False) is Scene.UNSPECIFIED


@pytest.mark.parametrize("value", [5, 42, -1, 2**31 - 1])
@pytest.mark.parametrize("required", [True, False])
def test_unknown_scene_values_are_refused_whether_required_or_not(value: int, required: bool):
    with pytest.raises(InvalidArgument) as info:
        scene_from_wire(value, required=required)
    assert info.value.field == "scene"


def test_an_unknown_scene_from_a_newer_peer_arrives_as_an_int_and_is_refused():
    """Proto3 enums are open: a value we do not know parses, and scene_from_wire stops it."""
    request = recognition_pb2.RecognizeRequest.FromString(b"\x10\x63")  # field 2 (scene) = 99
    assert request.scene == 99
    with pytest.raises(InvalidArgument):
        scene_from_wire(request.scene, required=False)


@pytest.mark.parametrize(
    "rec",
    [
        Recognition(CardStatus.ACTIVE, (Entitlement.SENIOR_60, Entitlement.DISABLED), 300),
        Recognition(CardStatus.ACTIVE, tuple(Entitlement), 1),
        Recognition(CardStatus.ACTIVE, (), 0),
        Recognition(CardStatus.LOST, (), 60),
        Recognition(CardStatus.SUSPENDED, (), 60),
        Recognition(CardStatus.EXPIRED, (), 86400),
        Recognition(CardStatus.UNKNOWN, (), 5),
    ],
)
def test_a_recognition_survives_a_round_trip_through_bytes(rec: Recognition):
    assert recognition_from_wire(_over_the_wire(recognition_to_wire(rec))) == rec


def test_recognition_to_wire_sets_each_field():
    msg = recognition_to_wire(Recognition(CardStatus.ACTIVE, (Entitlement.STUDENT,), 120))
    assert msg.status == types_pb2.CARD_STATUS_ACTIVE
    assert list(msg.entitlements) == [types_pb2.ENTITLEMENT_STUDENT]
    assert msg.cache_ttl_seconds == 120


def test_the_ttl_read_from_the_wire_is_a_plain_int():
    rec = recognition_from_wire(
        recognition_pb2.RecognizeResponse(status=types_pb2.CARD_STATUS_ACTIVE, cache_ttl_seconds=7)
    )
    assert rec.ttl_seconds == 7
    assert type(rec.ttl_seconds) is int


@pytest.mark.parametrize("status", [0, 6, 42, 2**31 - 1, -1])
def test_an_unknown_or_unspecified_status_from_a_peer_becomes_unknown(status: int):
    msg = recognition_pb2.RecognizeResponse(cache_ttl_seconds=30)
    msg.status = status  # type: ignore[assignment]
    rec = recognition_from_wire(_over_the_wire(msg))
    assert rec.status is CardStatus.UNKNOWN
    assert rec.ttl_seconds == 30


def test_an_unknown_status_drops_whatever_entitlements_came_with_it():
    raw = b"\x08\x2a\x12\x02\x01\x04\x18\x3c"  # status=42, entitlements=[1, 4], ttl=60
    rec = recognition_from_wire(recognition_pb2.RecognizeResponse.FromString(raw))
    assert rec == Recognition(CardStatus.UNKNOWN, (), 60)


def test_unknown_entitlement_values_are_dropped_and_known_ones_kept_in_order():
    raw = b"\x08\x01\x12\x05\x04\x09\x00\x01\x63"  # ACTIVE, entitlements=[4, 9, 0, 1, 99]
    rec = recognition_from_wire(recognition_pb2.RecognizeResponse.FromString(raw))
    assert rec.status is CardStatus.ACTIVE
    assert rec.entitlements == (Entitlement.DISABLED, Entitlement.SENIOR_60)
    assert all(isinstance(e, Entitlement) for e in rec.entitlements)


@pytest.mark.parametrize(
    "status", [CardStatus.LOST, CardStatus.SUSPENDED, CardStatus.EXPIRED, CardStatus.UNKNOWN]
)
def test_entitlements_sent_with_a_status_other_than_active_are_dropped(status: CardStatus):
    msg = recognition_pb2.RecognizeResponse(
        status=status.value,  # type: ignore[arg-type]
        entitlements=[types_pb2.ENTITLEMENT_SENIOR_60, types_pb2.ENTITLEMENT_STUDENT],
        cache_ttl_seconds=10,
    )
    rec = recognition_from_wire(_over_the_wire(msg))
    assert rec.status is status
    assert rec.entitlements == ()


def test_an_empty_answer_reads_as_unknown_with_nothing_cached():
    """A peer that sends nothing at all gives no entitlements and a zero TTL."""
    rec = recognition_from_wire(recognition_pb2.RecognizeResponse.FromString(b""))
    assert rec == Recognition(CardStatus.UNKNOWN, (), 0)
