"""The README's claim that the append-lock trigger is what keeps a tailing
reader from skipping a late commit, shown both ways, deterministically: with
the trigger a second writer waits for the first to commit; with the trigger
dropped (in this test's own database) the reader skips the first writer's event."""

from __future__ import annotations

import asyncio

import asyncpg

INSERT = "insert into events (stream, version, type, data) values ($1, 1, 'Tested', '{}'::jsonb)"


async def _race(database_url: str) -> tuple[bool, list[str], list[str]]:
    """Writer 1 inserts and holds its transaction open; writer 2 inserts and
    commits; a reader tails; then writer 1 commits. Returns whether writer 2 had
    to wait for writer 1, what the reader saw first and what it saw after."""
    first, second, reader = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        tx = first.transaction()
        await tx.start()
        await first.execute(INSERT, "late")
        later = asyncio.create_task(second.execute(INSERT, "early"))
        done, _ = await asyncio.wait({later}, timeout=1.0)
        waited = not done
        head = await reader.fetchval("select coalesce(max(position), 0) from events")
        seen = [r[0] for r in await reader.fetch("select stream from events order by position")]
        await tx.commit()
        await later
        after = [
            r[0]
            for r in await reader.fetch(
                "select stream from events where position > $1 order by position", head
            )
        ]
        return waited, seen, after
    finally:
        for conn in (first, second, reader):
            await conn.close()


async def test_the_trigger_makes_a_late_commit_wait_its_turn(database_url: str) -> None:
    waited, seen, after = await _race(database_url)
    assert waited  # writer 2 waited for writer 1's commit
    assert seen == []  # nothing visible while writer 1 was open
    assert after == ["late", "early"]  # the reader, resuming at its checkpoint, sees both in order


async def test_without_the_trigger_a_tailing_reader_skips(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("drop trigger events_serialize_appends on events")
    finally:
        await conn.close()
    waited, seen, after = await _race(database_url)
    assert not waited
    assert seen == ["early"]  # the reader's checkpoint moved past writer 1's position
    assert after == []  # so writer 1's event, committed later, is never read: skipped
