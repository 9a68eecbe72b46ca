"""External tools the tests need (moto_server, promtool, kubectl, a tmpfs mount, ...)."""

from __future__ import annotations

import os

import pytest


def missing_tool(message: str) -> None:
    """Skip the test for a tool this machine lacks; in CI (CI=true) that is a failure instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
