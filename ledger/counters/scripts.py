"""The Lua scripts (``lua/*.lua``), loaded once, and their replies decoded into types.

Each script is ``lib.lua`` followed by its own file. redis-py's ``Script`` calls
them by SHA and falls back to EVAL after a SCRIPT FLUSH or a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any


@cache
def source(name: str) -> str:
    files = resources.files("ledger.counters") / "lua"
    lib = (files / "lib.lua").read_text()
    return lib + "\n" + (files / f"{name}.lua").read_text()


NAMES = ("reserve", "confirm", "settle", "begin", "init", "unlimit", "peek")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _indices(reply: list[Any]) -> tuple[int, ...]:
    return tuple(int(i) - 1 for i in reply[1:])  # Lua counts from 1


# ---------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Ok:
    """Reserved on every counter. ``tightest``: index of the budget with the least
    room left afterwards, and that room in nano-USD."""

    tightest: int
    room_nanos: int


@dataclass(frozen=True, slots=True)
class Deny:
    index: int  # the first budget that cannot take the estimate
    spent_nanos: int
    reserved_nanos: int


@dataclass(frozen=True, slots=True)
class OverLimit:
    index: int  # the first rate limit that is used up
    used: int


@dataclass(frozen=True, slots=True)
class Missing:
    indices: tuple[int, ...]  # counters to rebuild before trying again


@dataclass(frozen=True, slots=True)
class Dup:
    pass


@dataclass(frozen=True, slots=True)
class More:
    """Counters the caller must declare and call again with: (key, registry entry)."""

    counters: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Settled:
    charged: int  # counters charged by this call


@dataclass(frozen=True, slots=True)
class Confirmed:
    added: int  # counters that had lost the reservation and got it back


def reserve_reply(reply: list[Any]) -> Ok | Deny | OverLimit | Missing | Dup:
    verdict = _text(reply[0])
    if verdict == "ok":
        return Ok(int(reply[1]) - 1, int(reply[2]))
    if verdict == "deny":
        return Deny(int(reply[1]) - 1, int(reply[2]), int(reply[3]))
    if verdict == "limited":
        return OverLimit(int(reply[1]) - 1, int(reply[2]))
    if verdict == "missing":
        return Missing(_indices(reply))
    if verdict == "dup":
        return Dup()
    raise ValueError(f"unexpected reserve reply {reply!r}")


def _more(reply: list[Any]) -> More:
    items = [_text(v) for v in reply[1:]]
    return More(tuple(zip(items[0::2], items[1::2], strict=True)))


def settle_reply(reply: list[Any]) -> Settled | More:
    verdict = _text(reply[0])
    if verdict == "ok":
        return Settled(int(reply[1]))
    if verdict == "more":
        return _more(reply)
    raise ValueError(f"unexpected settle reply {reply!r}")


def confirm_reply(reply: list[Any]) -> Confirmed | Deny | Missing | More | Dup:
    verdict = _text(reply[0])
    if verdict == "more":
        return _more(reply)
    if verdict == "dup":
        return Dup()
    if verdict == "ok":
        return Confirmed(int(reply[1]))
    if verdict == "over":
        return Deny(int(reply[1]) - 1, int(reply[2]), int(reply[3]))
    if verdict == "missing":
        return Missing(_indices(reply))
    raise ValueError(f"unexpected confirm reply {reply!r}")


def begin_reply(reply: list[Any]) -> str | None:
    """The generation token to rebuild under, or None if the counter exists."""
    if _text(reply[0]) == "exists":
        return None
    return _text(reply[1])


def init_reply(reply: Any) -> str:
    verdict = _text(reply)
    if verdict not in ("ok", "exists", "stale"):
        raise ValueError(f"unexpected init reply {reply!r}")
    return verdict
