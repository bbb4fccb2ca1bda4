"""Server-sent events, as upstreams send them: split into events without changing a
byte, so they pass through as they came, while the gateway reads their data.

Lines end with CRLF, LF or CR; an empty line ends an event; ``data:`` lines (one
optional space after the colon) are joined with LF; ``event:``, ``id:``,
``retry:`` and comment lines are kept in the raw bytes and otherwise ignored
(https://html.spec.whatwg.org/multipage/server-sent-events.html).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes  # the event as received, its terminating empty line included
    data: bytes | None  # its data lines joined, or None if it had none


class Splitter:
    def __init__(self) -> None:
        self._buffer = b""
        self._raw = bytearray()
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events: list[Event] = []
        buf = self._buffer
        start = 0
        while True:
            lf, cr = buf.find(b"\n", start), buf.find(b"\r", start)
            ends = [i for i in (lf, cr) if i >= 0]
            if not ends:
                break
            i = min(ends)
            if buf[i : i + 1] == b"\r" and i + 1 == len(buf):
                break  # a CR at the end may be half of a CRLF: wait for the next byte
            width = 2 if buf[i : i + 2] == b"\r\n" else 1
            line = buf[start:i]
            self._raw += buf[start : i + width]
            start = i + width
            if not line:
                events.append(Event(bytes(self._raw), b"\n".join(self._data) if self._data else None))
                self._raw.clear()
                self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        self._buffer = buf[start:]
        return events

    def rest(self) -> bytes:
        """Whatever came after the last complete event (a stream that ended mid-event)."""
        return bytes(self._raw) + self._buffer
