"""Tokenizers: text <-> token ids, by name.

``byte`` (256 ids, no dependency) is the default; ``tiktoken:ENCODING`` and a ``tokenizer.json``
(the `tokenizers` package) are optional extras. Nothing here downloads: a tiktoken encoding must
already be in tiktoken's cache. A tokenizer's ``name`` goes into the token cache's key.

(Named ``tokenizer`` rather than ``tokenizers`` so it is never mistaken for the `tokenizers`
package it imports.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import DataError

__all__ = ["Tokenizer", "get_tokenizer"]

_INSTALL_TOKENIZERS = "install with pip install 'sqa-search[tokenizers]'"


@dataclass(frozen=True)
class Tokenizer:
    """A text <-> token ids mapping. ``name`` identifies it in cache keys and reports."""

    name: str
    vocab_size: int
    _encode_batch: Callable[[list[str]], list[Sequence[int]]] = dataclasses.field(repr=False)
    _decode: Callable[[Sequence[int]], str] = dataclasses.field(repr=False)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._encode_batch([text])[0], dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self._encode_batch(texts)]

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._decode([int(i) for i in np.asarray(ids).reshape(-1)])

    @property
    def dtype(self) -> type:
        # uint16 halves the cache for any vocabulary that fits (byte, GPT-2's 50257).
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32


def _byte_tokenizer() -> Tokenizer:
    return Tokenizer(
        name="byte",
        vocab_size=256,
        _encode_batch=lambda texts: [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts],
        _decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"),
    )


_TOKENIZER_FORMS = (
    "'byte', 'tiktoken:ENCODING' (needs tiktoken and the encoding already cached), "
    "or a path to a tokenizer.json (needs tokenizers; 'tokenizers:PATH' also works)"
)

_tiktoken_lock = threading.Lock()


def _tiktoken_tokenizer(encoding: str) -> Tokenizer:
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        raise DataError(f"tokenizer 'tiktoken:{encoding}' needs the tiktoken package; {_INSTALL_TOKENIZERS}") from None
    known = tiktoken.list_encoding_names()
    if encoding not in known:
        raise DataError(f"tokenizer 'tiktoken:{encoding}' is unknown: tiktoken encodings are {known}")

    # tiktoken fetches an encoding's files over the network on first use and caches them.
    # A trial must never download, so the fetch is swapped for a refusal while we load: a
    # cached encoding loads as usual, a missing one gives a clear error instead of a hang.
    def refuse(blobpath: str) -> bytes:
        if "://" not in blobpath:
            with open(blobpath, "rb") as f:
                return f.read()
        raise DataError(
            f"tokenizer 'tiktoken:{encoding}' is not available offline: its file {blobpath} is not "
            "in tiktoken's cache (TIKTOKEN_CACHE_DIR) and sqa-search does not download at run time; "
            "use 'byte' or a tokenizer.json path instead"
        )

    with _tiktoken_lock:
        original = tiktoken.load.read_file
        tiktoken.load.read_file = refuse
        try:
            enc = tiktoken.get_encoding(encoding)
        finally:
            tiktoken.load.read_file = original
    return Tokenizer(
        name=f"tiktoken:{encoding}",
        vocab_size=enc.n_vocab,
        _encode_batch=lambda texts: enc.encode_ordinary_batch(texts),
        _decode=enc.decode,
    )


def _hf_tokenizer(path: str) -> Tokenizer:
    # The file first: a wrong path is the user's first problem, with or without the package.
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"tokenizer {path!r} is not allowed: no such tokenizer.json file")
    try:
        import tokenizers
    except ImportError:
        raise DataError(f"tokenizer {path!r} needs the tokenizers package; {_INSTALL_TOKENIZERS}") from None
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as exc:
        raise DataError(f"tokenizer {path!r} is not allowed: tokenizers could not read it ({exc})") from exc
    # The file's hash goes into the name, so retraining a tokenizer in place invalidates the cache.
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    return Tokenizer(
        name=f"tokenizers:{file.resolve()}#{digest}",
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        _encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
        _decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
    )


def get_tokenizer(name: str | Tokenizer = "byte") -> Tokenizer:
    """A tokenizer by name; see ``_TOKENIZER_FORMS`` for the names understood."""
    if isinstance(name, Tokenizer):
        return name
    if not isinstance(name, str) or not name:
        raise DataError(f"tokenizer {name!r} is not allowed: give {_TOKENIZER_FORMS}")
    if name == "byte":
        return _byte_tokenizer()
    if name.startswith("tiktoken:"):
        return _tiktoken_tokenizer(name[len("tiktoken:"):])
    if name.startswith("tokenizers:"):
        return _hf_tokenizer(name[len("tokenizers:"):])
    if name.endswith(".json"):
        return _hf_tokenizer(name)
    raise DataError(f"tokenizer {name!r} is unknown: give {_TOKENIZER_FORMS}")
