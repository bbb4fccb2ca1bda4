-- Server-side secrets shared by every gateway process (the end-user hash key
-- when LEDGER_USER_HASH_SECRET is not set). Generated once, never logged.
create table ledger_secrets (
    name       text primary key,
    value      bytea not null,
    created_at timestamptz not null default now()
);
