"""Suite-wide: the tests' caches (timings, the machine-speed reference, tokens, calibrated
profiles) live in one temporary directory, never in the user's ~/.cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_root(tmp_path_factory):
    old = os.environ.get("SQA_SEARCH_CACHE")
    os.environ["SQA_SEARCH_CACHE"] = str(tmp_path_factory.mktemp("sqa_search_cache"))
    yield
    if old is None:
        os.environ.pop("SQA_SEARCH_CACHE", None)
    else:
        os.environ["SQA_SEARCH_CACHE"] = old


# CI sets this: a skip there means a component was not installed, so the test never ran. Only
# tests that need a CUDA device may skip (the machine has none); any other skip fails the run.
ONLY_CUDA_SKIPS = "SQA_SEARCH_ONLY_CUDA_SKIPS"
_session = {}


def pytest_sessionstart(session):
    _session["it"] = session


def _skip_reason(report) -> str:
    return str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not os.environ.get(ONLY_CUDA_SKIPS):
        return
    bad = [f"{r.nodeid}: {_skip_reason(r)}" for r in terminalreporter.stats.get("skipped", [])
           if "cuda" not in _skip_reason(r).lower()]
    if bad:
        terminalreporter.write_line(f"{ONLY_CUDA_SKIPS} is set and {len(bad)} test(s) skipped for a reason "
                                    "other than CUDA:", red=True)
        for line in bad:
            terminalreporter.write_line("  " + line, red=True)
        # terminal_summary runs inside sessionfinish, before pytest reads the exit status
        _session["it"].exitstatus = pytest.ExitCode.TESTS_FAILED
