"""Checkpoint conversion: torch state dicts <-> Flax parameter trees (one file per family)."""
