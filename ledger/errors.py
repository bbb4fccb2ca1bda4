"""The domain error hierarchy.

Driver errors (asyncpg, redis) are translated into these at the storage
boundary; the gateway translates these into HTTP errors in one middleware.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error the ledger raises on purpose."""


class SettingsError(LedgerError):
    """A configuration value is missing or invalid; the message names it."""


class MigrationError(LedgerError):
    """The schema cannot be brought up to date safely."""


class EmbeddedServerError(LedgerError):
    """An embedded PostgreSQL or Redis server could not be started or stopped."""


class StoreError(LedgerError):
    """Base class of event store errors."""


class StoreUnavailable(StoreError):
    """PostgreSQL could not be reached (or did not answer) within the time bound."""


class AppendOutcomeUnknown(StoreUnavailable):
    """The append may or may not have committed (PostgreSQL went away, or the time
    bound passed, during the commit). Read the stream to know."""


class StoreOverloaded(StoreUnavailable):
    """The append queue stayed full for longer than the time bound."""


class InvalidEvent(StoreError):
    """An event PostgreSQL cannot store (a NUL character, say); fails only its own append."""


class ConcurrencyError(StoreError):
    """An append lost the optimistic-concurrency race on its stream."""

    def __init__(self, stream: str, expected_version: int, actual_version: int) -> None:
        self.stream = stream
        self.expected_version = expected_version
        self.actual_version = actual_version
        super().__init__(
            f"stream {stream!r} is at version {actual_version}, append expected version {expected_version}"
        )


class ArchiveError(LedgerError):
    """An archive of the event log cannot be written or read as it is (a file whose
    checksum does not match its manifest, a partition that changed meanwhile)."""


class ArchiveRefused(ArchiveError):
    """Archiving was refused because it would break something live (the current
    month, admissions the sweeper has yet to settle, projections behind)."""
