"""Test plugin root: every module in tests/fixtures/ is loaded as a pytest plugin,
so each area (dict, relay, filtermail, ...) keeps its fixtures in its own file."""

from pathlib import Path

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)
