"""sqa-search: search and auto-tune Sparse Query Attention head configurations.

The public names are loaded on first use, so `import sqa_search.search.pareto` or `sqa-search --help`
does not pay for importing torch.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "AttentionSpec": "layer.spec",
    "SpecError": "layer.spec",
    "VARIANTS": "layer.spec",
    "SparseQueryAttention": "layer.attention",
    "ModelConfig": "layer.model",
    "ProxyLM": "layer.model",
    "load_layer": "decide.load",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'sqa_search' has no attribute {name!r}")
