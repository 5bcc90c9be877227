"""The data of the quality trials in one import, for callers written before it was split.

Two kinds of quality signal feed the search:

* **Language modelling** on real text: `corpus` (where text comes from, the builtin corpus),
  `tokenizer` (text <-> ids), `tokens` (the token cache and LM batches).
* **MQAR** (multi-query associative recall): `mqar`.

New code imports from those modules; this one only re-exports their public names, so
``from sqa_search.quality.data import load_tokens`` keeps working.
"""

from __future__ import annotations

from .corpus import DEFAULT_TEXT_EXTENSIONS, TextSource, load_text, parse_source
from .errors import DataError
from .mqar import IGNORE_INDEX, MQARConfig, mqar_batch
from .tokenizer import Tokenizer, get_tokenizer
from .tokens import TokenData, default_cache_dir, lm_batch, load_tokens, val_batches

__all__ = [
    "DataError",
    "TextSource",
    "parse_source",
    "load_text",
    "Tokenizer",
    "get_tokenizer",
    "TokenData",
    "load_tokens",
    "default_cache_dir",
    "lm_batch",
    "val_batches",
    "MQARConfig",
    "mqar_batch",
    "IGNORE_INDEX",
    "DEFAULT_TEXT_EXTENSIONS",
]
