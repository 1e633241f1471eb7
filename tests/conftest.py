"""Test plugin root: every module in tests/fixtures/ is loaded as a pytest plugin,
so each area (dict, relay, filtermail, ...) keeps its fixtures in its own file."""

import logging
import os
import shutil
from pathlib import Path

import pytest

from chatmaild.common.service import RoleFilter
from tests.sandbox import leftover_processes, session_base_if_made

# make bench's upgrade run (bench/bench_upgrade.py); see the module's docstring
collect_ignore = [] if os.environ.get("CHATMAILD_UPGRADE_TEST") else ["test_deb_upgrade.py"]

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)


@pytest.fixture(autouse=True)
def _daemon_log_handlers_removed():
    """Daemons' main() run in-process install a root handler on the test's captured
    stderr; once that capture closed, a later log line printed "Logging error ...
    I/O operation on closed file".  Each test's own handlers go with it (pytest's
    capture handlers stay: they carry no RoleFilter)."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if any(isinstance(f, RoleFilter) for f in handler.filters):
            root.removeHandler(handler)


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
