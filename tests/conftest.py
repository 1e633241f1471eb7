"""Test plugin root: every module in tests/fixtures/ is loaded as a pytest plugin,
so each area (dict, relay, filtermail, ...) keeps its fixtures in its own file."""

import shutil
from pathlib import Path

import pytest

from tests.sandbox import leftover_processes, session_base_if_made

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a Postfix, Dovecot or daemon of the suite's relays still runs."""
    base = session_base_if_made()
    if base is None:
        return
    left = leftover_processes(base)
    if left:
        print("\nprocesses of the suite's relays are still running:\n  " + "\n  ".join(left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        shutil.rmtree(base, ignore_errors=True)
