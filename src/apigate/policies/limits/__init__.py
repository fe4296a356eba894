"""Shared machinery of the limiting policies: algorithms, keys, counters, clock, config."""
