"""Pure domain: money, windows, the cost bound, prices, tokens, privacy, splits and
limit parsing. No IO: `make lint` (import-linter) refuses a driver import here."""
