"""Trace-driven cluster simulator that drives the real extender; baselines; report."""
