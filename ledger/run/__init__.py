"""The composition root: the `ledger` CLI (which wires the gateway and the
projections), embedded servers for dev and tests, and log configuration.
Nothing else in `ledger` imports from here."""
