-- Split cost allocation (ledger/allocation.py): each charged request's share
-- per tag dimension and value, so a dimension's rows sum to the total spend.
-- dimension '' is every tag of the request, whatever its form.
-- Built by the spend_allocations projection (projections/allocation.py).
create table spend_allocations (
    position    bigint not null,            -- the charge's log position (spend_logs.position)
    recorded_at timestamptz not null,
    dimension   text not null,
    value       text not null,
    share       numeric not null,
    primary key (position, dimension, value)
);
create index spend_allocations_dim_idx on spend_allocations (dimension, recorded_at);

create table view_templates.spend_allocations (like public.spend_allocations including all);
