-- Readers that want some event types only (tag definitions for the budget
-- cache, charges for a counter rebuild) scan this index instead of the log.
create index events_type_position_idx on events (type, position);
