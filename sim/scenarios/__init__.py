"""Embedded scenario files (`default.yaml` for `copack demo`, `large.yaml` for the bench)."""
