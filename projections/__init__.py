"""Projection workers: tail the event log and maintain the views people query."""
