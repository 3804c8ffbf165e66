"""Clearing between districts: period close, signed batch exchange, verification, positions.

The serving district (where the trip happened) closes a settlement day:
per home district it builds a batch of that day's accepted trips by the home
district's card-holders, signs it with its settlement key and streams it to
the home district (``Settlement.ExchangeBatch``). The home district verifies
every line and answers with a signed acknowledgement. Rejected lines become
disputes; positions are netted per day; a day both sides agree on is SETTLED.

Modules: :mod:`signing` (Ed25519 documents), :mod:`batch` (lines, chunks,
digests), :mod:`store` (the tables, SQLite or PostgreSQL), :mod:`verify`
(the home district's checks), :mod:`receiver` (the home side of an exchange),
:mod:`sender` (close, represent, confirm), :mod:`positions` (net positions),
:mod:`crash` (the crash-injection hook the tests use).
"""
