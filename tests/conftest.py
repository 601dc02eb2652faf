"""Session-wide test settings shared by every component's tests."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI machines have 2 cores shared with vLLM servers: deadlines would only add flakiness.
settings.register_profile(
    "copack", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "copack"))
