"""A batch verified as it arrives: the node's spool, read by the verifier while it grows.

The node spools a neighbour's batch chunk by chunk
(:class:`broker.settlement.clearing.batch.Spool`). When the sender says which
batch it is sending (:class:`Hint`, in the call's metadata: its word only, never
trusted), the node's verifier process starts checking the chunks already
spooled while the rest arrive (:meth:`broker.settlement.clearing.receiver.
Receiver.receive_streamed`), inside the transaction that stores the batch:
nothing is committed before the signed trailer checks out and names that batch.

The node tells the verifier how the stream ended through a pipe (:class:`EndPipe`):
the trailer, the sender's settlement keys and the node's clock (:class:`End`), or
nothing, when the call was cancelled or refused. The verifier reads the spool and
the pipe through the node's ``/proc/<pid>/fd/<n>`` (:class:`Tail`); a spool that
grows no more for :data:`STALL_S` ends the reading there (the node verifies the
whole batch once its trailer comes, as when no hint was given).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime

from broker.core.signing import Signed
from broker.settlement.clearing.batch import Digest

HINT_KEY = "yk-batch"  # gRPC metadata: "<period>/<sequence>/<kind>"
POLL_S = 0.02  # how long the verifier waits for the node between looks at the spool
STALL_S = 60.0  # a sender sends its first chunk before its call opens, then keeps going
_HEAD = 8


@dataclass(frozen=True)
class Hint:
    """Which batch the sender says it is sending (checked against its signed trailer)."""

    period: date
    seq: int
    kind: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((HINT_KEY, f"{self.period.isoformat()}/{self.seq}/{self.kind}"),)

    @staticmethod
    def from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> Hint | None:
        """The hint in a call's metadata; ``None`` if there is none or it does not read."""
        value = next((v for k, v in metadata or () if k == HINT_KEY), None)
        if not isinstance(value, str):
            return None
        try:
            day, seq, kind = value.split("/")
            hint = Hint(date.fromisoformat(day), int(seq), kind)
        except ValueError:
            return None
        return hint if hint.kind in ("close", "represent") and hint.seq > 0 else None


@dataclass(frozen=True)
class End:
    """How a stream ended with its trailer: the node's word to its verifier."""

    trailer: Signed
    keys: tuple[tuple[str, str], ...]  # the sender's settlement keys, (key id, PEM)
    now: datetime

    def encode(self) -> bytes:
        """Length-prefixed fields: the trailer's three, the instant, then each key's two."""
        fields = [
            self.trailer.document,
            self.trailer.key_id.encode(),
            self.trailer.signature,
            self.now.isoformat().encode(),
            *(part.encode() for key in self.keys for part in key),
        ]
        body = b"".join(len(f).to_bytes(4, "big") + f for f in fields)
        return len(body).to_bytes(_HEAD, "big") + body

    @staticmethod
    def decode(data: bytes) -> End | None:
        """The end message in ``data``; ``None`` unless it is whole."""
        if len(data) < _HEAD or len(data) != _HEAD + int.from_bytes(data[:_HEAD], "big"):
            return None
        fields, at = [], _HEAD
        while at < len(data):
            size = int.from_bytes(data[at : at + 4], "big")
            fields.append(data[at + 4 : at + 4 + size])
            at += 4 + size
        if at != len(data) or len(fields) < 4 or len(fields) % 2:
            return None
        document, key_id, signature, now, *keys = fields
        return End(
            Signed(document, key_id.decode(), signature),
            tuple((k.decode(), pem.decode()) for k, pem in zip(keys[::2], keys[1::2], strict=True)),
            datetime.fromisoformat(now.decode()),
        )


class EndPipe:
    """The node's side: a pipe whose read end the verifier opens by path."""

    def __init__(self) -> None:
        self._r, w = os.pipe()
        os.set_blocking(w, False)
        self._w: int | None = w

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self._r}"

    def end(self, end: End | None) -> None:
        """Say how the stream ended (``None``: without a trailer), once; then close the
        write end. A message the pipe cannot take at once is cut short, which the
        verifier reads as no trailer (the node then verifies the whole spool)."""
        if self._w is None:
            return
        try:
            if end is not None:
                data = end.encode()
                try:
                    while data:
                        data = data[os.write(self._w, data) :]
                except BlockingIOError:
                    pass
        finally:
            os.close(self._w)
            self._w = None

    def close(self) -> None:
        """Both ends: only once the verifier is done with the read end."""
        self.end(None)
        if self._r >= 0:
            os.close(self._r)
            self._r = -1


class StreamEnded(Exception):
    """The stream ended without a trailer, or stalled: nothing of it is to be committed."""


class Tail:
    """The verifier's side: the chunks of a spool as the node writes them, then the end."""

    def __init__(self, spool_path: str, end_path: str, stall_s: float = STALL_S) -> None:
        self._fd = os.open(spool_path, os.O_RDONLY)
        try:
            self._pipe = os.open(end_path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            os.close(self._fd)
            raise
        self._stall_s = stall_s
        self._at = 0
        self._message = bytearray()
        self._ended = False  # the node closed its end of the pipe
        self.digest = Digest()  # over the chunks read, as the node's spool works it out

    def chunks(self) -> Iterator[bytes]:
        """Each chunk once it is whole in the spool; the last one once the node said the
        stream ended with its trailer. :class:`StreamEnded` if it ended otherwise."""
        idle_since: float | None = None
        while True:
            chunk = self._next()
            if chunk is not None:
                idle_since = None
                yield chunk
                continue
            if self._ended:
                if self.end() is None:
                    raise StreamEnded("the stream ended without a trailer")
                if os.fstat(self._fd).st_size != self._at:
                    raise StreamEnded("the spool ends inside a chunk")
                return
            now = time.monotonic()
            idle_since = idle_since if idle_since is not None else now
            if now - idle_since > self._stall_s:
                raise StreamEnded(f"no chunk came for {self._stall_s:.0f} s")
            self._wait(POLL_S)
            if self._ended and self.end() is None:
                raise StreamEnded("the stream ended without a trailer")

    def end(self) -> End | None:
        """The node's end message, once it closed the pipe; ``None`` before, or without one."""
        return End.decode(bytes(self._message)) if self._ended else None

    def _next(self) -> bytes | None:
        head = os.pread(self._fd, _HEAD, self._at)
        if len(head) < _HEAD:
            return None
        size = int.from_bytes(head, "big")
        body = os.pread(self._fd, size, self._at + _HEAD)
        while len(body) < size:  # a short read of a big chunk: ask for the rest
            more = os.pread(self._fd, size - len(body), self._at + _HEAD + len(body))
            if not more:
                return None  # not all written yet
            body += more
        self._at += _HEAD + size
        self.digest.update(body)
        return body

    def _wait(self, timeout: float) -> None:
        ready, _, _ = select.select([self._pipe], [], [], timeout)
        if not ready:
            return
        while True:
            try:
                data = os.read(self._pipe, 65536)
            except BlockingIOError:
                return
            if not data:
                self._ended = True
                return
            self._message += data

    def close(self) -> None:
        for fd in (self._fd, self._pipe):
            if fd >= 0:
                os.close(fd)
        self._fd = self._pipe = -1
