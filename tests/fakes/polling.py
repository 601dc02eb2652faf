"""Waiting for state that background threads reach (watches, streams, leases, samplers)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def eventually(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `cond` until it is truthy (and return it): a test waits for the state instead of
    sleeping a guessed time. Not a timing assertion: the timeout only bounds a hung test."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
