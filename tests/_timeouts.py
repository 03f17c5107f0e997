"""Timeouts in tests bound a hang, they never measure speed: each is generous, and all of them (pytest-
timeout's and the tests' own waits) are multiplied by AIMV2_TEST_TIMEOUT_SCALE (default 1) on a machine
known to be slow or loaded, so that load alone never fails a test."""
from __future__ import annotations

import os


def scale() -> float:
    raw = os.environ.get("AIMV2_TEST_TIMEOUT_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"AIMV2_TEST_TIMEOUT_SCALE={raw!r} is not a number: set it to e.g. 2") from None
    if value <= 0:
        raise SystemExit(f"AIMV2_TEST_TIMEOUT_SCALE={raw!r} must be positive")
    return value


def scaled(seconds: float) -> float:
    return seconds * scale()
