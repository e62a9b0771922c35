"""Helpers for driftrec's tests and benchmarks (not used at run time)."""
