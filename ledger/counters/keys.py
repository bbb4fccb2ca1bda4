"""Every Redis key the ledger uses, formatted and parsed in this one place.

A subject's keys (its window counters and its generation token) share a Redis
Cluster hash slot through the ``{subject}`` hash tag, so a script over one
subject's keys can run on a cluster. (If a subject contains ``}``, the hash tag
ends there; it still ends there for every key of that subject.)

* ``ledger:{<subject>}:w:<epoch>:<window start>`` — a window counter (hash):
  ``spent``, ``reserved``, ``pos`` and one ``r:<request id>`` field per
  reservation it holds, ``x:<request id>`` per charge settled without one.
* ``ledger:{<subject>}:gen`` — the subject's generation token: created by a
  rebuild before it reads the log, deleted when a settle finds a counter
  missing; a rebuild writes only if the token is still the one it saw.
* ``ledger:{<subject>}:reg`` — the subject's registry of counters (hash: key ->
  ``start ms|end ms|epoch|limit``), written by a rebuild before it reads the
  log. Confirm and settle reach every counter of the newest epoch whose window
  holds the admission time through it, whatever the caller's definitions say.
* ``ledger:open`` / ``ledger:open:keys`` — the index of open reservations
  (deadline by request id, and the counter keys each one holds), so the
  sweeper finds reservations that never reached the log. On Redis Cluster each
  subject keeps its own (``ledger:{<subject>}:open`` / ``...:open:keys``), in
  its counters' slot, so that one script updates a counter and its index.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "ledger:"
OPEN = "ledger:open"
OPEN_KEYS = "ledger:open:keys"


# On a cluster, the per-subject open indexes and the registries are found with SCAN.
OPEN_SUFFIX = "}:open"
OPEN_PATTERN = PREFIX + "{*" + OPEN_SUFFIX
REGISTRY_SUFFIX = "}:reg"
REGISTRY_PATTERN = PREFIX + "{*" + REGISTRY_SUFFIX


def open_index(subject: str | None) -> tuple[str, str]:
    """The open-reservation index (zset, hash) for ``subject``'s counters: the one
    global index on a single Redis (``subject`` None), the subject's own on a cluster."""
    if subject is None:
        return OPEN, OPEN_KEYS
    return f"{PREFIX}{{{subject}}}:open", f"{PREFIX}{{{subject}}}:open:keys"


def subject_of(key: str, suffix: str) -> str | None:
    """The subject of a per-subject key ``ledger:{<subject>}<suffix>`` (an open index
    with OPEN_SUFFIX, a registry with REGISTRY_SUFFIX), None if ``key`` is not one."""
    head = PREFIX + "{"
    if key.startswith(head) and key.endswith(suffix) and len(key) > len(head) + len(suffix):
        return key[len(head) : -len(suffix)]
    return None


def counter(subject: str, epoch: int, window_start: int) -> str:
    return f"{PREFIX}{{{subject}}}:w:{epoch}:{window_start}"


def generation(subject: str) -> str:
    return f"{PREFIX}{{{subject}}}:gen"


def registry(subject: str) -> str:
    return f"{PREFIX}{{{subject}}}:reg"


@dataclass(frozen=True, slots=True)
class CounterKey:
    subject: str
    epoch: int
    window_start: int


def parse_counter(key: str) -> CounterKey | None:
    """The parts of a counter key, or None if ``key`` is not one."""
    if not key.startswith(PREFIX + "{"):
        return None
    rest = key[len(PREFIX) + 1 :]
    subject, sep, tail = rest.rpartition("}:w:")
    if not sep:
        return None
    epoch, _, start = tail.partition(":")
    if not (epoch.isdigit() and start.lstrip("-").isdigit()):
        return None
    return CounterKey(subject, int(epoch), int(start))


def generation_of(counter_key: str) -> str:
    parsed = parse_counter(counter_key)
    if parsed is None:
        raise ValueError(f"not a counter key: {counter_key!r}")
    return generation(parsed.subject)


def join(keys: list[str]) -> str:
    """Counter keys as stored in the open-reservation index."""
    return "\n".join(keys)


def split(value: str) -> list[str]:
    return [k for k in value.split("\n") if k]
