-- One round trip per group commit: the writer's batch (lock, current versions,
-- version checks, insert, NOTIFY) runs as one function call in one implicit
-- transaction, instead of BEGIN, five statements and COMMIT.
--
-- Arguments, one entry per append: its stream, the version its caller expects
-- (null: any) and how many events it brings; then every event's type and data,
-- flattened in append order.
--
-- Returns one row per event written (stream, version, position) and one row per
-- append refused for its expected version (stream, the stream's current
-- version, position null, refused = the append's 1-based index).
create function ledger_append_batch(
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
    -- Invariant: the append lock is held from here to commit, so the versions
    -- read by the next statements (fresh snapshots, taken after the lock: every
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
                select ev.stream, max(ev.version) as v from events ev
                where ev.stream = any(p_streams) group by ev.stream
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
            select ev.stream, max(ev.version) as v from events ev
            where ev.stream = any(p_streams) group by ev.stream
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
        select coalesce(jsonb_object_agg(c.stream, c.v), '{}'::jsonb) into current_versions
        from (
            select e.stream, max(e.version) as v from events e
            where e.stream = any(p_streams) group by e.stream
        ) c;
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
