-- The event log, partitioned so that old traffic can be archived and dropped
-- (`ledger archive`, ledger/postgres/archive.py). Layout:
--
--   events                       partition by list (the stream's kind: split_part(stream, ':', 1))
--     events_traffic             'request' and 'denied' streams, partition by range (recorded_at)
--       events_2026_12, ...      one per UTC month, created ahead by ledger_ensure_event_partitions()
--       events_traffic_default   default: a row whose month has no partition yet (moved out later)
--     events_books               default: definitions (tag:, key:, customer:), alerts, deliveries...
--
-- Why two levels: the books (every budget definition) rebuild the counters and
-- the definitions cache and must never leave with an archived month; requests
-- and denials are the volume. Only month partitions of events_traffic are ever
-- detached, and only by `ledger archive`.
--
-- Invariants kept from 0001 and 0021:
-- * positions: one identity sequence for the whole tree, handed out under the
--   append lock, so commit order is position order across partitions;
-- * the append lock is taken by a BEFORE INSERT statement trigger on the root,
--   on events_traffic and on every leaf (a statement trigger fires only for the
--   table an INSERT names, so each level that can be named carries it);
-- * append-only: UPDATE, DELETE and TRUNCATE are refused at every level;
-- * a stream version exists once: a unique (stream, version) cannot span
--   partitions (a unique index must contain the partition key), so each stream's
--   head lives in stream_heads, checked and advanced after every insert under the
--   append lock. It never depends on a detached partition: a request id stays
--   unique after its month is archived. Each leaf keeps a unique (stream,
--   version) of its own, which also serves reads by stream.
-- * the tx column, NOTIFY (ledger_append_batch) unchanged.
--
-- Existing rows are copied with their positions, times and tx.

-- ---------------------------------------------------------------- the old table aside

alter table events rename to events_v1;
drop trigger events_serialize_appends on events_v1;
drop trigger events_append_only on events_v1;
alter table events_v1 drop constraint events_stream_version_key;
drop index events_type_position_idx;
drop index events_recorded_at_idx;
alter index events_pkey rename to events_v1_pkey;
alter sequence events_position_seq rename to events_v1_position_seq;

-- ---------------------------------------------------------------- the new tree

create table events (
    position    bigint      generated always as identity (cache 1),
    stream      text        not null check (length(stream) between 1 and 512),
    version     integer     not null check (version >= 1),
    type        text        not null check (length(type) between 1 and 128),
    data        jsonb       not null,
    recorded_at timestamptz not null default now(),
    tx          xid8        not null default pg_current_xact_id()
) partition by list (split_part(stream, ':', 1));

create table events_traffic partition of events
    for values in ('request', 'denied') partition by range (recorded_at);
create table events_traffic_default partition of events_traffic default;
create table events_books partition of events default;

-- Cascade to every partition, present and future. No unique index on position:
-- a unique index must include the partition key, and the key is an expression;
-- the identity (generated always) is what makes positions unique.
create index events_position_idx on events (position);
create index events_type_position_idx on events (type, position);
create index events_recorded_at_idx on events using brin (recorded_at);

create table stream_heads (
    stream  text    primary key,
    version integer not null check (version >= 1)
);

-- After every insert into the tree (the append lock is held: taken before the
-- statement, kept to commit): refuse a version at or below its stream's head,
-- or twice in one statement, as the old unique constraint did (same SQLSTATE,
-- so the store's handling is unchanged), then advance the heads.
create function events_keep_heads() returns trigger
language plpgsql as $$
begin
    if exists (
        select 1 from new_rows n join stream_heads h on h.stream = n.stream where n.version <= h.version
    ) or exists (
        select 1 from new_rows n group by n.stream, n.version having count(*) > 1
    ) then
        raise exception 'duplicate key value violates unique constraint "stream_heads_pkey"'
            using errcode = 'unique_violation',
                  detail = 'a stream version exists once (stream_heads)';
    end if;
    insert into stream_heads as h (stream, version)
    select n.stream, max(n.version) from new_rows n group by n.stream
    on conflict (stream) do update set version = greatest(h.version, excluded.version);
    return null;
end $$;

-- The triggers every table of the tree carries (see the header); a leaf also
-- gets its unique (stream, version).
create function ledger_events_guard(p_table regclass, p_leaf boolean) returns void
language plpgsql volatile as $$
declare
    rel text := (select relname from pg_class where oid = p_table);
begin
    execute format(
        'create trigger events_serialize_appends before insert on %s '
        'for each statement execute function events_take_append_lock()', p_table);
    execute format(
        'create trigger events_append_only before update or delete or truncate on %s '
        'for each statement execute function events_refuse_change()', p_table);
    execute format(
        'create trigger events_keep_heads after insert on %s referencing new table as new_rows '
        'for each statement execute function events_keep_heads()', p_table);
    if p_leaf then
        execute format('alter table %s add constraint %I unique (stream, version)',
                       p_table, left(rel, 40) || '_stream_version_key');
    end if;
end $$;

select ledger_events_guard('events', false);
select ledger_events_guard('events_traffic', false);
select ledger_events_guard('events_traffic_default', true);
select ledger_events_guard('events_books', true);

-- The UTC month [p_month, p_month + 1 month) of traffic as a partition, created
-- if missing; rows of that month that landed in the default partition are
-- moved into it first (they would otherwise block the attach). Returns whether
-- it created the partition. Callers hold the append lock (nothing lands in the
-- default partition meanwhile). Attaching takes only SHARE UPDATE EXCLUSIVE on
-- events_traffic: readers and appenders are not blocked.
create function ledger_create_event_partition(p_month date) returns boolean
language plpgsql volatile as $$
declare
    m date := date_trunc('month', p_month)::date;
    name text := 'events_' || to_char(m, 'YYYY_MM');
    lo timestamptz := m::timestamp at time zone 'UTC';
    hi timestamptz := (m + interval '1 month')::timestamp at time zone 'UTC';
begin
    if to_regclass(name) is not null then
        return false;
    end if;
    execute format('create table %I (like events_traffic including defaults including constraints)', name);
    if exists (select 1 from events_traffic_default where recorded_at >= lo and recorded_at < hi) then
        -- the only place a row leaves a partition: it moves, positions and all
        execute format(
            'insert into %I select * from events_traffic_default '
            'where recorded_at >= $1 and recorded_at < $2', name) using lo, hi;
        alter table events_traffic_default disable trigger events_append_only;
        delete from events_traffic_default where recorded_at >= lo and recorded_at < hi;
        alter table events_traffic_default enable trigger events_append_only;
    end if;
    execute format('alter table events_traffic attach partition %I for values from (%L) to (%L)', name, lo, hi);
    perform ledger_events_guard(name::regclass, true);
    return true;
end $$;

-- This month's partition and the next p_ahead months', plus one for every
-- month that has rows in the default partition. Run by migrations (below) and
-- by every gateway periodically (ledger/postgres/partitions.py). Returns the
-- partitions it created.
create function ledger_ensure_event_partitions(p_ahead integer default 2) returns setof text
language plpgsql volatile as $$
declare
    m date;
    months date[];
begin
    perform ledger_append_lock();
    -- read whole before the loop: an open cursor on the default partition would
    -- forbid the ALTERs that move its rows
    select array_agg(x order by x) into months from (
        select (date_trunc('month', now() at time zone 'UTC') + make_interval(months => g))::date as x
        from generate_series(0, p_ahead) as g
        union
        select date_trunc('month', d.recorded_at at time zone 'UTC')::date from events_traffic_default d
    ) s;
    foreach m in array months loop
        if ledger_create_event_partition(m) then
            return next 'events_' || to_char(m, 'YYYY_MM');
        end if;
    end loop;
end $$;

-- ---------------------------------------------------------------- the rows

-- Every month the old traffic covers gets its partition first (no row goes
-- through the default partition).
select ledger_create_event_partition(m)
from (
    select distinct date_trunc('month', recorded_at at time zone 'UTC')::date as m
    from events_v1 where split_part(stream, ':', 1) in ('request', 'denied')
) s;

insert into events (position, stream, version, type, data, recorded_at, tx) overriding system value
select position, stream, version, type, data, recorded_at, tx from events_v1 order by position;

-- The sequence goes on where the old one stood (not at max(position): a
-- rolled-back append may have drawn numbers past it, and those are never reused).
select setval(
    pg_get_serial_sequence('events', 'position'),
    greatest((select last_value from events_v1_position_seq), (select coalesce(max(position), 0) from events_v1), 1),
    (select is_called from events_v1_position_seq) or exists (select 1 from events_v1)
);

drop table events_v1;

select ledger_ensure_event_partitions(2);

-- ---------------------------------------------------------------- appends

-- As 0021, except that a stream's current version is its head in stream_heads
-- (the trigger above advances it), not max(version) over the partitions.
create or replace function ledger_append_batch(
    p_streams text[],
    p_expected integer[],
    p_counts integer[],
    p_types text[],
    p_data text[],
    p_channel text
) returns table (stream text, version integer, "position" bigint, refused integer)
language plpgsql volatile as $$
#variable_conflict use_column
declare
    current_versions jsonb;
    v integer;
    i integer;
    k integer;
    offs integer := 0;
    s_col text[] := '{}';
    v_col integer[] := '{}';
    t_col text[] := '{}';
    d_col text[] := '{}';
    last_position bigint;
    kinds text;
begin
    -- Invariant: the append lock is held from here to commit, so the heads read
    -- by the next statements (fresh snapshots, taken after the lock: every
    -- earlier holder has committed) cannot change before our insert, and
    -- positions become visible in order (see 0001_events.sql).
    perform ledger_append_lock();
    if (select count(distinct s) from unnest(p_streams) as s) = coalesce(array_length(p_streams, 1), 0) then
        -- Every stream once (the usual batch): set-based, linear in the batch.
        return query
            with a as (
                select u.s, u.e, u.c, u.i from unnest(p_streams, p_expected, p_counts) with ordinality as u(s, e, c, i)
            ),
            cur as (
                select h.stream, h.version as v from stream_heads h where h.stream = any(p_streams)
            )
            select a.s, coalesce(cur.v, 0), null::bigint, a.i::integer
            from a left join cur on cur.stream = a.s
            where a.e is not null and a.e <> coalesce(cur.v, 0);
        with a as (
            select u.s, u.e, u.c, u.i,
                   coalesce(sum(u.c) over (order by u.i rows between unbounded preceding and 1 preceding), 0) as off
            from unnest(p_streams, p_expected, p_counts) with ordinality as u(s, e, c, i)
        ),
        cur as (
            select h.stream, h.version as v from stream_heads h where h.stream = any(p_streams)
        ),
        ok as (
            select a.s, coalesce(cur.v, 0) as base, a.c, a.off from a left join cur on cur.stream = a.s
            where a.e is null or a.e = coalesce(cur.v, 0)
        ),
        rows as (
            select ok.s, ok.base + g.k as v, ok.off + g.k as j
            from ok, generate_series(1, ok.c) as g(k)
        ),
        evs as (
            select x.t, x.d, x.j from unnest(p_types, p_data) with ordinality as x(t, d, j)
        )
        select array_agg(rows.s order by rows.j), array_agg(rows.v order by rows.j),
               array_agg(evs.t order by rows.j), array_agg(evs.d order by rows.j)
        into s_col, v_col, t_col, d_col
        from rows join evs on evs.j = rows.j;
    else
        -- A stream more than once: in order, each append on what the ones before left.
        select coalesce(jsonb_object_agg(h.stream, h.version), '{}'::jsonb) into current_versions
        from stream_heads h where h.stream = any(p_streams);
        for i in 1 .. coalesce(array_length(p_streams, 1), 0) loop
            v := coalesce((current_versions ->> p_streams[i])::integer, 0);
            if p_expected[i] is not null and p_expected[i] <> v then
                stream := p_streams[i];
                version := v;
                "position" := null;
                refused := i;
                return next;
            else
                for k in 1 .. p_counts[i] loop
                    s_col := s_col || p_streams[i];
                    v_col := v_col || (v + k);
                    t_col := t_col || p_types[offs + k];
                    d_col := d_col || p_data[offs + k];
                end loop;
                current_versions := jsonb_set(current_versions, array[p_streams[i]], to_jsonb(v + p_counts[i]));
            end if;
            offs := offs + p_counts[i];
        end loop;
    end if;
    if coalesce(array_length(s_col, 1), 0) = 0 then
        return;
    end if;
    return query
        insert into events as e (stream, version, type, data)
        select u.s, u.v, u.t, u.d::jsonb
        from unnest(s_col, v_col, t_col, d_col) with ordinality as u(s, v, t, d, n)
        order by u.n
        returning e.stream, e.version, e.position, null::integer;
    -- the last position this session drew: ours (the lock keeps others out)
    last_position := currval(pg_get_serial_sequence('events', 'position'));
    select string_agg(distinct x, ',' order by x) into kinds from unnest(t_col) as x;
    -- "<last position> <types,...>": listeners that care about a few types
    -- (tag definitions) can ignore the rest.
    perform pg_notify(p_channel, left(last_position::text || ' ' || kinds, 7900));
end
$$;
