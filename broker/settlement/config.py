"""What settlement reads of a node's configuration: ``[ledger]``, ``[settlement]``, and a view.

``LedgerConfig`` and ``SettlementKeyConfig`` are this package's sections of
node.toml; ``SettlementSettings`` is the view of the whole node config that
ledgers, clearing and statements take, so that they never import the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from broker.fares.agreements import Agreement
from broker.fares.config import FaresConfig
from broker.trust.config import TrustSettings


@dataclass(frozen=True)
class LedgerConfig:
    """``[ledger]``: operators' trips (``Settlement.SubmitTrips``) and the clearing tables.

    Attributes:
        path: the ledger's SQLite file (the clearing tables go beside it).
        url: a PostgreSQL URL instead of SQLite (``YIKATONG_LEDGER_URL``
            overrides it; empty: none).
        schema: the PostgreSQL schema, one per district.
    """

    path: Path | None = None
    url: str | None = field(default=None, metadata={"env": "YIKATONG_LEDGER_URL"})
    schema: str = "yikatong"

    @property
    def configured(self) -> bool:
        """Whether this node keeps trips at all."""
        return self.path is not None or self.url is not None


@dataclass(frozen=True)
class SettlementKeyConfig:
    """``[settlement]``.

    Attributes:
        key_file: the Ed25519 key that signs batches, acknowledgements and fare
            publications (separate from the TLS key); ``None``: this node does
            not clear with its peers.
        duplicate_window_s: a trip with the same operator, card, gate and place
            as an accepted one under another trip id, at most this many seconds
            apart, is refused ``suspected_duplicate`` (the same tap uploaded
            twice); 0 turns the check off. Trips without a gate id are never
            refused.
        max_batch_lines: the most lines one batch from a neighbour may hold:
            counted chunk by chunk as it arrives, the chunk that would pass it
            is refused (``RESOURCE_EXHAUSTED``) before it is spooled. Twice a
            10-million-trip day.
        max_batch_bytes: the same for the bytes of its serialized lines (a line
            is about 100-150 bytes): 200 bytes a line at the most lines.
        intake_listen: ``host:port`` of the intake port (``YIKATONG_INTAKE_LISTEN``
            overrides it; empty: none): the trip intake's worker process then
            serves ``SubmitTrips`` and ``GetTripOutcomes`` there itself, with the
            node's certificate, trust and access rules, so that operators'
            uploads never enter the process that answers gates
            (``broker.node.intake_port``). The node's own port answers them too.
        worker_cpus: the CPUs (Linux's numbers, as ``taskset`` takes them) that
            the worker processes (trip intake, home verification) and ``broker
            settle close`` keep to; the node's own process, which answers gates,
            then keeps off them. Empty (the default): the scheduler places them.
            On a small node, one CPU for the workers keeps an upload's kernel
            work off the gates' CPU (``broker.core.priority``).
    """

    key_file: Path | None = None
    duplicate_window_s: int = 5
    max_batch_lines: int = 20_000_000
    max_batch_bytes: int = 4_000_000_000
    intake_listen: str | None = field(default=None, metadata={"env": "YIKATONG_INTAKE_LISTEN"})
    worker_cpus: tuple[int, ...] = ()


class SettlementSettings(TrustSettings, Protocol):
    """What ledgers, clearing and statements need to know about their node.

    ``broker.node.config.NodeConfig`` provides it.
    """

    @property
    def ledger(self) -> LedgerConfig: ...
    @property
    def settlement(self) -> SettlementKeyConfig: ...
    @property
    def fares(self) -> FaresConfig: ...
    @property
    def agreements(self) -> tuple[Agreement, ...]: ...

    def agreement(self, district: str) -> Agreement | None: ...
