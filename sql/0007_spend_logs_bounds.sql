-- Every value the gateway admits fits the views (no event can stall a projection):
-- token counts are bigint (an upstream may report anything; the gateway clamps at 10^12).
-- Denied rows say why: the blocking tag, the request's estimate and the reason.
alter table spend_logs alter column prompt_tokens type bigint;
alter table spend_logs alter column completion_tokens type bigint;
alter table spend_logs add column denied_tag text;
alter table spend_logs add column estimate numeric;
alter table spend_logs add column reason text;
alter table spend_logs add column usage_clamped boolean not null default false;

alter table view_templates.spend_logs alter column prompt_tokens type bigint;
alter table view_templates.spend_logs alter column completion_tokens type bigint;
alter table view_templates.spend_logs add column denied_tag text;
alter table view_templates.spend_logs add column estimate numeric;
alter table view_templates.spend_logs add column reason text;
alter table view_templates.spend_logs add column usage_clamped boolean not null default false;
