"""Shared pytest set-up: every module in tests/fixtures/ is loaded as a plugin.

Each part of the project keeps its fixtures in its own module there (brokers, fake Waldur, ...), so no two
people edit one conftest.
"""

import pkgutil
from pathlib import Path

pytest_plugins = [
    f"tests.fixtures.{module.name}" for module in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
]
