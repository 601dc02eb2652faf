"""Fixtures of the workloads tests."""

from tests.fakes.kube_fixtures import fake_kube  # noqa: F401  (the fake API server per test)
