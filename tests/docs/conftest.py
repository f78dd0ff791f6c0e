"""Markers of the documentation and packaging checks."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "package_registry: installs packages from the package registry (PyPI) into a temporary virtualenv; "
        "deselect with -m 'not package_registry' on a machine without it",
    )
