-- Views maintained by projection workers (projections/). Each worker applies a
-- batch of events and advances its checkpoint in the same transaction.

create table projection_checkpoints (
    name       text primary key,
    position   bigint not null default 0,
    updated_at timestamptz not null default now()
);

-- One row per finished or denied request. Small by design: no prompts, no answers.
create table spend_logs (
    position          bigint primary key,      -- log position of the event it came from
    request_id        text not null,
    recorded_at       timestamptz not null,
    admitted_at       timestamptz,
    kind              text not null,           -- spend | expired | released | denied
    model             text,
    provider          text,
    tags              text[] not null default '{}',
    user_hash         text,
    metadata          jsonb not null default '{}',
    prompt_tokens     integer not null default 0,
    completion_tokens integer not null default 0,
    cost              numeric not null default 0,
    status            integer,
    latency_ms        real,
    streamed          boolean not null default false
);
create index spend_logs_time_idx on spend_logs (recorded_at, position);
create index spend_logs_tags_idx on spend_logs using gin (tags);
create index spend_logs_user_idx on spend_logs (user_hash, recorded_at) where user_hash is not null;
create index spend_logs_request_idx on spend_logs (request_id);

-- Per tag: its budget definition (if any) and all-time totals.
create table tag_info (
    tag             text primary key,
    live            boolean not null default false,   -- defined and not deleted
    description     text,
    max_budget      numeric,
    soft_budget     numeric,
    budget_duration text,
    anchor          timestamptz,
    total_spend     numeric not null default 0,
    request_count   bigint not null default 0,
    denial_count    bigint not null default 0,
    first_seen      timestamptz,
    last_seen       timestamptz
);

create table tag_daily_spend (
    tag               text not null,
    day               date not null,
    model             text not null,
    spend             numeric not null default 0,
    requests          bigint not null default 0,
    prompt_tokens     bigint not null default 0,
    completion_tokens bigint not null default 0,
    primary key (tag, day, model)
);

create table user_spend (
    user_hash  text primary key,
    spend      numeric not null default 0,
    requests   bigint not null default 0,
    first_seen timestamptz,
    last_seen  timestamptz
);

create table user_daily_spend (
    user_hash text not null,
    day       date not null,
    spend     numeric not null default 0,
    requests  bigint not null default 0,
    primary key (user_hash, day)
);

-- Charges per budgeted tag and budget window (window of the admission time).
create table tag_window_spend (
    tag          text not null,
    duration     text not null,
    window_start timestamptz not null,
    spend        numeric not null default 0,
    requests     bigint not null default 0,
    primary key (tag, duration, window_start)
);
