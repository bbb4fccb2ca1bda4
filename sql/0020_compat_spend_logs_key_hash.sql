-- The API key (its SHA-256, never the key) each spend_logs row was made with,
-- for LiteLLM's per-key views: /spend/logs?api_key=, /key/info spend,
-- /global/spend/report by key or team, the api_keys breakdown of daily activity.
-- Nullable: rows of requests made with the admin key, and rows written before
-- the request events carried the key, have none.
alter table spend_logs add column if not exists key_hash text;
alter table view_templates.spend_logs add column if not exists key_hash text;
create index if not exists spend_logs_key_idx on spend_logs (key_hash, recorded_at) where key_hash is not null;
create index if not exists spend_logs_key_idx on view_templates.spend_logs (key_hash, recorded_at)
    where key_hash is not null;
