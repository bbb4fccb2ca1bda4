-- The event log: the single source of truth. Append-only.
--
-- Ordering: every append takes the transaction-level advisory lock
-- ledger_append_lock() before its rows get their positions, and holds it until
-- commit. Commit order therefore equals position order, and a reader that tails
-- `position > checkpoint` can never skip an event that commits late. The lock is
-- taken by a BEFORE INSERT statement trigger, so no writer can forget it.
-- (The alternative, reading below pg_snapshot_xmin, lets any long transaction in
-- the database stall every reader and makes checkpoints (tx, position) pairs.)

create table events (
    position    bigint generated always as identity (cache 1) primary key,
    stream      text        not null check (length(stream) between 1 and 512),
    version     integer     not null check (version >= 1),
    type        text        not null check (length(type) between 1 and 128),
    data        jsonb       not null,
    recorded_at timestamptz not null default now(),
    tx          xid8        not null default pg_current_xact_id(),
    -- optimistic concurrency and idempotency: a stream version exists once
    constraint events_stream_version_key unique (stream, version)
);

create index events_recorded_at_idx on events using brin (recorded_at);

-- 4242_0001 is the append lock's key; ledger/store.py uses the same function.
create function ledger_append_lock() returns void
language sql volatile as $$ select pg_advisory_xact_lock(4242, 1) $$;

create function events_take_append_lock() returns trigger
language plpgsql as $$
begin
    perform ledger_append_lock();
    return null;
end $$;

create trigger events_serialize_appends
    before insert on events
    for each statement execute function events_take_append_lock();

create function events_refuse_change() returns trigger
language plpgsql as $$
begin
    raise exception 'events is append-only: % refused', tg_op
        using errcode = 'restrict_violation';
end $$;

create trigger events_append_only
    before update or delete or truncate on events
    for each statement execute function events_refuse_change();
