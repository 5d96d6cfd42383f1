"""pytest plugin for CI: appends the node id of every skipped test or module to the file in $TAGGER_CI_SKIPPED."""

from __future__ import annotations

import os

import pytest


def _record(nodeid: str) -> None:
    with open(os.environ["TAGGER_CI_SKIPPED"], "a", encoding="utf-8") as f:
        f.write(nodeid + "\n")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a module-level importorskip
        _record(report.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and report.when in ("setup", "call"):
        _record(report.nodeid)
