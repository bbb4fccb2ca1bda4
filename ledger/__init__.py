"""budget-ledger: event-sourced budget ledger for LLM API traffic."""

__version__ = "0.1.0"
