-- Empty copies of the view tables that replay and verify build fresh tables
-- from, so a view can be rebuilt even after its live table was dropped.
-- A migration that changes a view table changes its template the same way.
create schema view_templates;
create table view_templates.spend_logs (like public.spend_logs including all);
create table view_templates.tag_info (like public.tag_info including all);
create table view_templates.tag_daily_spend (like public.tag_daily_spend including all);
create table view_templates.user_spend (like public.user_spend including all);
create table view_templates.user_daily_spend (like public.user_daily_spend including all);
create table view_templates.tag_window_spend (like public.tag_window_spend including all);
