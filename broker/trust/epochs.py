"""Node epochs: the name peers pin for a district's node, moved on when its key is stolen.

gRPC Python's client cannot check a server certificate against a revocation
list, so a stolen node key is retired by name instead. The district's bundle
names the node's current epoch (``e2.node.500111.yikatong.cy``); peers pin
that name, and a certificate without it is refused once they hold the bundle.

The epoch is kept in ``<d>/node-epoch``, two lines at most::

    current=2
    next=3

``next`` is there only while a move is pending: between ``certs rotate --node
--next-epoch`` (a new key, its certificate naming both epochs) and ``certs
publish-epoch`` (the bundle names ``next``, which becomes ``current``). A
missing file is epoch 1 with no move pending. Every node certificate carries
the epoch names of :func:`epoch_names` beside ``node.<code>.yikatong.cy``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.trust.certstore import CertOpsError, DistrictPaths
from broker.trust.config import node_epoch_name
from broker.trust.pki import write_public

FIRST_EPOCH = 1
_MAX_EPOCH = 999_999  # what NODE_NAME_RE (and so a bundle's node_name) allows
_NUMBER = re.compile(r"[0-9]{1,6}")


@dataclass(frozen=True)
class NodeEpoch:
    """The node's current epoch, and the next one while a move to it is pending."""

    current: int = FIRST_EPOCH
    next: int | None = None

    def __post_init__(self) -> None:
        if not FIRST_EPOCH <= self.current < _MAX_EPOCH:
            raise ValueError(f"epoch {self.current} is outside 1..{_MAX_EPOCH - 1}")
        if self.next is not None and self.next != self.current + 1:
            raise ValueError(f"the next epoch must be {self.current + 1}, not {self.next}")

    @property
    def pending(self) -> bool:
        return self.next is not None

    def begin_move(self) -> NodeEpoch:
        """The move to the next epoch recorded (unchanged if one is pending already)."""
        return NodeEpoch(self.current, self.current + 1)

    def complete_move(self) -> NodeEpoch:
        if self.next is None:
            raise CertOpsError(
                "no node epoch move is pending: run `certs rotate --node --next-epoch` first"
            )
        return NodeEpoch(self.next)

    def render(self) -> str:
        lines = [f"current={self.current}"]
        if self.next is not None:
            lines.append(f"next={self.next}")
        return "\n".join(lines) + "\n"


def parse_epoch(text: str, source: str = "node-epoch") -> NodeEpoch:
    """A :class:`NodeEpoch` from the file's text; :class:`CertOpsError` if malformed."""
    values: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        key, sep, value = line.strip().partition("=")
        if not line.strip():
            continue
        if (
            not sep
            or key not in ("current", "next")
            or key in values
            or not _NUMBER.fullmatch(value)
        ):
            raise CertOpsError(f"{source} line {number}: expected current=N or next=N+1")
        values[key] = int(value)
    if "current" not in values:
        raise CertOpsError(f"{source}: no current=N line")
    try:
        return NodeEpoch(values["current"], values.get("next"))
    except ValueError as exc:
        raise CertOpsError(f"{source}: {exc}") from None


def read_epoch(paths: DistrictPaths) -> NodeEpoch:
    """The district's node epoch (epoch 1, nothing pending, when it has no file yet)."""
    try:
        text = paths.epoch_file.read_text()
    except FileNotFoundError:
        return NodeEpoch()
    return parse_epoch(text, str(paths.epoch_file))


def write_epoch(paths: DistrictPaths, epoch: NodeEpoch) -> None:
    write_public(paths.epoch_file, epoch.render().encode())


def epoch_names(district: str, epoch: NodeEpoch) -> tuple[str, ...]:
    """The epoch DNS names a node certificate carries: current, and next while pending."""
    names = [node_epoch_name(district, epoch.current)]
    if epoch.next is not None:
        names.append(node_epoch_name(district, epoch.next))
    return tuple(names)


def pinned_name(district: str, epoch: NodeEpoch) -> str:
    """The node name the district's bundle publishes for peers to pin."""
    return node_epoch_name(district, epoch.current)
