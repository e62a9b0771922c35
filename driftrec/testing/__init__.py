"""Helpers for driftrec's tests (not used at run time)."""
