-- A projection that cannot apply a batch says so where every process sees it:
-- its error and since when (both null while it applies), for `ledger projections
-- status`, /health/ready and the ledger_projection_failing gauge. Before this a
-- poisoned batch was retried forever with only a log line to show for it.
alter table projection_checkpoints add column if not exists last_error text;
alter table projection_checkpoints add column if not exists failing_since timestamptz;
