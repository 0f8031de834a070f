"""Shared pytest set-up: every module in tests/fixtures/ is loaded as a plugin.

Each part of the project keeps its fixtures in its own module there (brokers, fake Waldur, ...), so no two
people edit one conftest.
"""

import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

pytest_plugins = [
    f"tests.fixtures.{module.name}" for module in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
]


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """A test that configures logging (the CLI does) must not leave its configuration to the next test."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
