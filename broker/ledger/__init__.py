"""The settlement ledger: every trip operators submit, stored before it is acknowledged."""

from broker.ledger.sqlite import SqliteLedger

__all__ = ["SqliteLedger"]
