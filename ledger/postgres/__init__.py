"""PostgreSQL: the event store (append with group commit, read, tail), migrations,
the read models (queries, reports, FOCUS export) and caches that follow the log."""
