"""Card references and recognition answers on the wire (yikatong.v1) and back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from broker._proto.yikatong.v1 import recognition_pb2, types_pb2
from broker.cards.model import (
    CardRef,
    CardStatus,
    Entitlement,
    LogPosition,
    Recognition,
    Scene,
    card_ref,
)
from broker.cards.updates import Change, Progress, Rewind, Update
from broker.core.errors import InvalidArgument

_STATUSES = {s.value for s in CardStatus}
_ENTITLEMENTS = {e.value for e in Entitlement}
_SCENES = {s.value for s in Scene}
_SCENE_OF = {s.value: s for s in Scene}


def card_from_wire(msg: types_pb2.CardRef, present: bool, prefix: str = "card") -> CardRef:
    """Validate a wire ``CardRef``; errors name the field (``card.card_number`` …)."""
    if not present:
        raise InvalidArgument(prefix, "is required")
    return card_ref(msg.issuer_region, msg.card_number, prefix)


def scene_from_wire(value: int, required: bool = True) -> Scene:
    """Validate a wire ``Scene``; unknown values (and, if ``required``, UNSPECIFIED) are refused."""
    if value not in _SCENES or (required and value == Scene.UNSPECIFIED):
        raise InvalidArgument("scene", "must be one of BUS, SCENIC_AREA, MUSEUM, LIBRARY")
    return _SCENE_OF[value]


def card_to_wire(ref: CardRef) -> types_pb2.CardRef:
    return types_pb2.CardRef(issuer_region=ref.issuer_region, card_number=ref.card_number)


def recognition_to_wire(rec: Recognition) -> recognition_pb2.RecognizeResponse:
    msg = recognition_pb2.RecognizeResponse(
        status=rec.status.value,  # type: ignore[arg-type]
        entitlements=[e.value for e in rec.entitlements],  # type: ignore[misc]
        cache_ttl_seconds=rec.ttl_seconds,
        max_stale_seconds=rec.max_stale_seconds,
    )
    if rec.position is not None:
        msg.position.CopyFrom(position_to_wire(rec.position))
    return msg


def position_to_wire(pos: LogPosition) -> recognition_pb2.LogPosition:
    return recognition_pb2.LogPosition(epoch=pos.epoch, seq=pos.seq, mark=pos.mark)


_TOKEN = frozenset("0123456789abcdef")


def position_from_wire(msg: recognition_pb2.LogPosition, field: str) -> LogPosition:
    """A position as a peer sent it: epoch and mark are a home's random hex tokens (at
    most 64 characters; the mark is empty at 0), else ``InvalidArgument`` naming the field."""
    if not 0 < len(msg.epoch) <= 64 or not set(msg.epoch) <= _TOKEN:
        raise InvalidArgument(f"{field}.epoch", "must be the epoch the home gave, in hex")
    if len(msg.mark) > 64 or not set(msg.mark) <= _TOKEN or (msg.seq > 0) != bool(msg.mark):
        raise InvalidArgument(f"{field}.mark", "must be the mark the home gave with seq")
    return LogPosition(msg.epoch, int(msg.seq), msg.mark)


def recognition_from_wire(msg: recognition_pb2.RecognizeResponse) -> Recognition:
    """Read a peer's answer defensively: unknown enum values become UNKNOWN / are dropped."""
    status = CardStatus(msg.status) if msg.status in _STATUSES else CardStatus.UNKNOWN
    ents = tuple(Entitlement(e) for e in msg.entitlements if e in _ENTITLEMENTS)
    if status is not CardStatus.ACTIVE:
        ents = ()
    position = None
    if msg.HasField("position"):
        try:
            position = position_from_wire(msg.position, "position")
        except InvalidArgument:
            position = None  # an odd position: the answer stands, without ordering by it
    return Recognition(
        status, ents, int(msg.cache_ttl_seconds), position, int(msg.max_stale_seconds)
    )


def update_to_wire(update: Update) -> recognition_pb2.StatusUpdate:
    if isinstance(update, Change):
        return recognition_pb2.StatusUpdate(
            change=recognition_pb2.StatusChange(
                position=position_to_wire(update.position),
                handle=update.handle,
                status=update.status.value,  # type: ignore[arg-type]
            )
        )
    if isinstance(update, Progress):
        return recognition_pb2.StatusUpdate(progress=position_to_wire(update.position))
    return recognition_pb2.StatusUpdate(restart=position_to_wire(update.position))


def update_from_wire(msg: recognition_pb2.StatusUpdate) -> Update:
    """A home's update, read defensively (``InvalidArgument`` naming the field): the handle
    must be one of ours in form, and a change to a status we do not know is "ask again"."""
    kind = msg.WhichOneof("update")
    if kind == "change":
        change = msg.change
        if not (len(change.handle) == 32 and set(change.handle) <= _TOKEN):
            raise InvalidArgument("change.handle", "must be 32 lowercase hex characters")
        status = CardStatus(change.status) if change.status in _STATUSES else CardStatus.ACTIVE
        return Change(position_from_wire(change.position, "change.position"), change.handle, status)
    if kind == "progress":
        return Progress(position_from_wire(msg.progress, "progress"))
    if kind == "restart":
        return Rewind(position_from_wire(msg.restart, "restart"))
    raise InvalidArgument("update", "is empty")


# google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
TIMESTAMP_MIN_S, TIMESTAMP_MAX_S = -62_135_596_800, 253_402_300_799
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def instant_from_wire(seconds: int, nanos: int, field: str) -> datetime:
    """A Timestamp's instant (UTC), or ``InvalidArgument`` naming ``field``'s part."""
    if not TIMESTAMP_MIN_S <= seconds <= TIMESTAMP_MAX_S:
        raise InvalidArgument(f"{field}.seconds", "must be within years 1 to 9999")
    if not 0 <= nanos <= 999_999_999:
        raise InvalidArgument(f"{field}.nanos", "must be from 0 to 999999999")
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
