"""Keyed hashes that stand in for card numbers and ID numbers.

Card numbers and ID numbers never appear in logs, cache keys or audit
records: wherever one would, the HMAC-SHA256 of it under the district's
secret hash key appears instead. Replicas of one district share the key (so
they share Redis entries); districts never share keys, so a hash means
nothing outside its district.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from broker.cards.model import CardRef
from broker.core.errors import ConfigError
from broker.core.files import make_private_dirs

KEY_BYTES = 32


class Hasher:
    """Keyed hashes of card references and ID numbers under one secret key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("hash key must be at least 16 bytes")
        self._key = key

    def card_key(self, ref: CardRef) -> str:
        """Stable opaque id of a card: HMAC over region and number, hex, 128 bits."""
        msg = f"card\x00{ref.issuer_region}\x00{ref.card_number}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def card_handle(self, ref: CardRef) -> str:
        """This district's name for another district's card in its cache and at the card's
        home (which pushes the card's changes by it): HMAC in a domain of its own, 128 bits,
        so the home, which knows the number behind it, learns nothing about the
        :meth:`card_key` this district's logs name the card by."""
        msg = f"handle\x00{ref.issuer_region}\x00{ref.card_number}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def holder_key(self, ssn: str) -> str:
        """Stable opaque id of a card-holder (follows the person across reissued cards)."""
        msg = f"holder\x00{ssn}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return "Hasher(<key redacted>)"


def create_key_file(path: Path) -> None:
    """Write a new random hash key to ``path``; refuse to overwrite one.

    The file is 0600 from birth whatever the umask, and durable once this
    returns: the key is fsync'ed, and so is the directory entry naming it.
    Missing directories are created 0700.
    """
    make_private_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fd, 0o600)  # the umask may have taken the owner's bits too
            fh.write(secrets.token_hex(KEY_BYTES) + "\n")
            fh.flush()
            os.fsync(fd)
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written key to refuse the next attempt
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_key_file(path: Path) -> Hasher:
    """Read a hash key written by :func:`create_key_file`."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"hash key file {path} does not exist; create it with `broker hash-key init {path}`"
        ) from exc
    try:
        return Hasher(bytes.fromhex(text))
    except ValueError as exc:
        raise ConfigError(f"hash key file {path} does not hold a hex key") from exc
