"""Shows the chaos reports at the end of the run (``make test`` included), without ``-s``."""

from __future__ import annotations

import pytest

from tests.chaos.harness import REPORTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("chaos report")
        for report in REPORTS:
            terminalreporter.write_line(report.line())
