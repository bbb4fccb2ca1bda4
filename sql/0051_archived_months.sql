-- The months `ledger archive` detached, written in the detach's own transaction:
-- a replay or verify that would read the log without their files (and so rebuild
-- views without them) is refused instead of silently counting too little.
create table archived_months (
    partition      text        primary key,
    first_position bigint,
    last_position  bigint,
    rows           bigint      not null,
    sha256         text        not null,
    archived_at    timestamptz not null default now()
);
