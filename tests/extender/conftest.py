"""Fixtures for the extender's tests: the fake API server (shared) and object builders."""

from __future__ import annotations

from tests.fakes.kube_fixtures import fake_kube  # noqa: F401  (re-exported fixture)
