"""sqa-search: search and auto-tune Sparse Query Attention head configurations."""

from .spec import AttentionSpec, SpecError, VARIANTS
from .attention import SparseQueryAttention

__all__ = ["AttentionSpec", "SpecError", "VARIANTS", "SparseQueryAttention"]
__version__ = "0.1.0"
