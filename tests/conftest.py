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
