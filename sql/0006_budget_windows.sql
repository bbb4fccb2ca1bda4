-- Budget windows, maintained by the `budget_windows` projection (projections/budgets.py),
-- so that a Redis counter is rebuilt from a checkpointed total plus the log's tail after
-- that checkpoint (O(recent), never a scan of the log), and so that the open
-- reservations can always be found from PostgreSQL, whatever happened to Redis.
--
-- Subjects name what a budget is attached to: 'tag:<name>' (later also API keys and
-- end users). Windows are about time, not definitions: a window's spend is every charge
-- admitted within [window_start, window_end) to a request that carried the subject as
-- budgeted, whatever duration or limit was in force then.

-- One row per charge and budgeted subject: the source for a window that a definition
-- change creates (its total is summed from here once, by the projection).
create table budget_charges (
    subject     text        not null,
    admitted_at timestamptz not null,
    position    bigint      not null,   -- of the charging event
    nanos       numeric     not null,   -- the charge in nano-USD, rounded up as counters do
    cost        numeric     not null,   -- the exact charge in USD
    primary key (subject, admitted_at, position)
);

-- Totals per subject and window of the definition in force (by its epoch, below).
create table budget_window_spend (
    subject      text        not null,
    window_start timestamptz not null,
    window_end   timestamptz not null,
    spend        numeric     not null default 0,
    spend_nanos  numeric     not null default 0,
    requests     bigint      not null default 0,
    primary key (subject, window_start, window_end)
);

-- The definition epoch the projection has applied per subject: a window row is only
-- trusted by a rebuild that asks for the same epoch.
create table budget_epochs (
    subject text primary key,
    epoch   bigint  not null  -- a log position (ledger/subjects.py)
);

-- Admitted requests with no terminal event yet (as of the projection's checkpoint).
create table open_reservations (
    stream         text        primary key,  -- request:<id>
    request_id     text        not null,
    position       bigint      not null,   -- of RequestAdmitted
    at             timestamptz not null,
    deadline       timestamptz not null,
    estimate_nanos numeric     not null,
    subjects       text[]      not null,
    nonce          text        not null default ''  -- the attempt's reservation name
);
create index open_reservations_deadline_idx on open_reservations (deadline);
create index open_reservations_subjects_idx on open_reservations using gin (subjects);

-- The per-window view moves here from spend_rollups (keyed by window bounds, not by
-- duration name, so that definitions that cut the same window share its total).
drop table tag_window_spend;
drop table view_templates.tag_window_spend;

create table view_templates.budget_charges (like public.budget_charges including all);
create table view_templates.budget_window_spend (like public.budget_window_spend including all);
create table view_templates.budget_epochs (like public.budget_epochs including all);
create table view_templates.open_reservations (like public.open_reservations including all);
