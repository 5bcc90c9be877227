"""The timing cache: one JSON file per record under ``<cache dir>/<fingerprint id>/<key>.json``.

The default directory is ``common.cache_dir("timings")`` (``$SQA_SEARCH_CACHE/timings``, else
``$XDG_CACHE_HOME/sqa_search/timings``, else ``~/.cache/sqa_search/timings``); a ``cache_dir``
argument replaces it and is used as is. The machine-speed probe keeps its references beside the
timings (``<cache dir>/<fingerprint id>/machine-reference-*.json``, one per probe, thread count and
clock). The key (`TimingResult.key`) covers everything the figure depends on, not the budget.
Only ``ok`` results are stored: an ``oom`` may come from memory another process held at the time
and an ``error`` from a bug since fixed, so both are re-tried.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from ..common import cache_dir as common_cache_dir
from .probe import probe_kind, stored_reference
from .record import TimingResult

__all__ = ["default_cache_dir", "cache_path", "load", "store", "cached"]


def default_cache_dir(cache_dir=None) -> Path:
    """The timings directory: the argument, else the shared cache root's ``timings``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return common_cache_dir("timings")


def cache_path(cache_dir, record: TimingResult) -> Path:
    return default_cache_dir(cache_dir) / record.fingerprint_id / f"{record.key}.json"


def load(path: Path, key: str) -> TimingResult | None:
    """The stored record at `path` if it is a good one for `key`, else None (time again)."""
    try:
        data = json.loads(path.read_text())
        result = TimingResult.from_dict(data)
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing or damaged: time again
    if result.key != key or result.status != "ok":
        return None
    if result.speed_corrected:
        # corrected against a reference since re-measured (or deleted): another scale, time again
        ref = stored_reference(fingerprint_id=result.fingerprint_id, cache_dir=path.parent.parent,
                               threads=result.threads, kind=probe_kind(result.mode), clock=result.clock)
        if ref is None or ref.probe_s != result.reference_probe_s:
            return None
    result.from_cache = True
    return result


def cached(record: TimingResult, cache_dir=None) -> TimingResult | None:
    """The stored record for the request `record` (as `new_record` made it), or None."""
    return load(cache_path(cache_dir, record), record.key)


def store(path: Path, result: TimingResult) -> None:
    """Write atomically (a temporary file, then a rename): a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data["from_cache"] = False
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
