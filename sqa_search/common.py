"""What several packages share and must agree on: the cache root, byte sizes of dtypes, what an
out-of-memory error looks like. Small and dependency-free (torch is imported only when asked), so
every package may import it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SQA_SEARCH_CACHE"

# bytes per element of the dtypes a workload may name
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def cache_root() -> Path:
    """``$SQA_SEARCH_CACHE``, else ``$XDG_CACHE_HOME/sqa_search``, else ``~/.cache/sqa_search``: one rule
    for every cache (timings, tokens, calibrated profiles, the speed reference)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sqa_search"


def cache_dir(kind: str) -> Path:
    """One cache's folder under `cache_root` (``timings``, ``tokens``, ``profiles``, ...)."""
    return cache_root() / kind


def is_oom(exc: BaseException) -> bool:
    """An allocation failure on any device: CUDA says "out of memory", the CPU allocator "can't
    allocate memory" or raises MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def resolve_device_name(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name unchanged."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
