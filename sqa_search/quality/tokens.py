"""The token cache and the language-modelling batches.

Text is tokenised once and cached on disk as a numpy memmap under ``common.cache_dir("tokens")``,
keyed by what the tokens depend on (the source and its content fingerprint, the tokenizer, the
split fraction, the cache format), so the many trials of a study share one copy and never
re-tokenise. ``TokenData.cache_key`` lets a study record which corpus it used.

Every batch function is a pure function of ``(seed, step)``: each candidate of a study sees the
same data in the same order, so differences in loss come from the architecture, not the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import torch

from .. import common
from .corpus import TextSource, check_source, iter_documents, open_hf_dataset, parse_source, source_fingerprint
from .errors import DataError, require_int
from .tokenizer import Tokenizer, get_tokenizer

__all__ = ["TokenData", "load_tokens", "default_cache_dir", "lm_batch", "val_batches"]

# Bump when the on-disk layout of the token cache changes.
_CACHE_FORMAT = 1


@dataclass
class TokenData:
    """Tokenised train and validation streams (read-only memmaps) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: str
    source: str
    cache_key: str
    from_cache: bool
    split: Literal["document", "tail"]  # how val was carved out; see load_tokens


def default_cache_dir() -> Path:
    """Where `load_tokens` caches by default: the shared cache root's ``tokens`` folder."""
    return common.cache_dir("tokens")


def _is_val(text: str, val_fraction: float) -> bool:
    # A hash of the content, not of the position: stable across runs, machines and orderings,
    # and the same document lands on the same side even when the corpus around it changes.
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


class _TokenWriter:
    """Appends token arrays to a temporary file in the cache folder."""

    def __init__(self, folder: Path, dtype):
        self.path = folder / f".tmp-{uuid.uuid4().hex}.bin"
        self.file = open(self.path, "wb")
        self.dtype = dtype
        self.count = 0

    def write(self, ids: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.count += len(ids)


def _tokenise_to_cache(
    docs: Iterable[str], tok: Tokenizer, val_fraction: float, folder: Path, name: str, meta: dict
) -> None:
    dtype = tok.dtype
    sep = "\n\n"  # documents are joined as paragraphs; byte vocab has no end-of-text token
    train, val = _TokenWriter(folder, dtype), _TokenWriter(folder, dtype)
    meta_tmp = folder / f".tmp-{uuid.uuid4().hex}.json"
    try:
        chunk: list[str] = []

        def flush():
            for text, ids in zip(chunk, tok.encode_batch([t + sep for t in chunk]), strict=True):
                (val if _is_val(text, val_fraction) else train).write(ids)
            chunk.clear()

        for doc in docs:
            chunk.append(doc)
            if len(chunk) >= 512:
                flush()
        flush()
        for w in (train, val):
            w.file.close()
        if train.count == 0 and val.count == 0:
            raise DataError(f"data source {meta['source']!r} is not allowed: it holds no text")
        split = "document"
        share = val.count / (train.count + val.count)
        if not 0.5 * val_fraction <= share <= 2 * val_fraction:
            # Too few documents for a by-document split to come near val_fraction (one file,
            # a handful of files): carve the last val_fraction of the stream (train documents,
            # then val documents) off as val instead. Still fixed and disjoint.
            split = "tail"
            data = np.concatenate([np.fromfile(train.path, dtype=dtype), np.fromfile(val.path, dtype=dtype)])
            n = len(data)
            n_val = max(1, int(round(n * val_fraction)))
            if n - n_val < 1:
                raise DataError(
                    f"data source {meta['source']!r} is not allowed: it gives only {n} token(s), "
                    "too few to split into train and validation"
                )
            data[: n - n_val].tofile(train.path)
            data[n - n_val:].tofile(val.path)
            train.count, val.count = n - n_val, n_val
        meta = dict(meta, n_train=train.count, n_val=val.count, dtype=np.dtype(dtype).name, split=split)
        # Renames are atomic on one filesystem: a reader sees a whole file or none. The
        # metadata goes last, so its presence means both token files are complete.
        os.replace(train.path, folder / f"{name}.train.bin")
        os.replace(val.path, folder / f"{name}.val.bin")
        meta_tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(meta_tmp, folder / f"{name}.json")
    finally:
        if meta_tmp.exists():
            meta_tmp.unlink()
        for w in (train, val):
            if not w.file.closed:
                w.file.close()
            if w.path.exists():
                w.path.unlink()


def _open_cache(folder: Path, name: str) -> dict | None:
    meta_path = folder / f"{name}.json"
    try:
        meta = json.loads(meta_path.read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        for part in ("train", "val"):
            if (folder / f"{name}.{part}.bin").stat().st_size != meta[f"n_{part}"] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def load_tokens(
    source: TextSource | str | os.PathLike | None = None,
    tokenizer: str | Tokenizer = "byte",
    val_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
) -> TokenData:
    """Tokenise a source once, cache it, and return train/val memmaps.

    Validation is carved out by document, with a hash of each document's text deciding its
    side (about ``val_fraction`` of documents). When that lands outside half to twice
    ``val_fraction`` of the tokens (one file, a handful of files), the last ``val_fraction`` of
    the token stream is taken as val instead. Either way the split is fixed and train and val
    are disjoint; ``TokenData.split`` says which rule applied. Tokens are read-only memmaps of
    dtype uint16 (vocabularies up to 65536) or uint32.
    """
    # Everything that can be checked without reading the text is checked first.
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction!r} is not allowed: must be a number in (0, 1)")
    src = parse_source(source)
    check_source(src)
    tok = get_tokenizer(tokenizer)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    hf_dataset = open_hf_dataset(src) if src.kind == "hf" else None
    key_material = {
        "format": _CACHE_FORMAT,
        "source": source_fingerprint(src, hf_dataset),
        "tokenizer": tok.name,
        "val_fraction": float(val_fraction),
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:24]
    label = {"builtin": "builtin", "hf": "hf"}.get(src.kind) or Path(src.path_or_name).name
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:40] or "data"
    name = f"{label}-{key}"

    meta = _open_cache(folder, name)
    from_cache = meta is not None
    if meta is None:
        folder.mkdir(parents=True, exist_ok=True)
        docs = iter_documents(src, hf_dataset)
        base = {"source": src.describe(), "tokenizer": tok.name, "vocab_size": tok.vocab_size, "key": key_material}
        _tokenise_to_cache(docs, tok, val_fraction, folder, name, base)
        meta = _open_cache(folder, name)
        if meta is None:
            raise DataError(f"token cache {str(folder / name)!r} could not be written or read back")
    dtype = np.dtype(meta["dtype"])
    if meta["n_train"] == 0:
        raise DataError(f"data source {src.describe()!r} is not allowed: it holds no text")
    train = np.memmap(folder / f"{name}.train.bin", dtype=dtype, mode="r", shape=(meta["n_train"],))
    val = np.memmap(folder / f"{name}.val.bin", dtype=dtype, mode="r", shape=(meta["n_val"],))
    return TokenData(
        train=train,
        val=val,
        vocab_size=int(meta["vocab_size"]),
        tokenizer=meta["tokenizer"],
        source=meta["source"],
        cache_key=key,
        from_cache=from_cache,
        split=meta["split"],
    )


# ---------------------------------------------------------------------------------------------
# LM batches
# ---------------------------------------------------------------------------------------------


def _check_lm(tokens, batch_size: int, seq_len: int, where: str) -> int:
    require_int(where, "batch_size", batch_size, 1)
    require_int(where, "seq_len", seq_len, 1)
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(
            f"{where}seq_len={seq_len} is not allowed: the token array has {n} tokens and a "
            f"sequence needs seq_len + 1 = {seq_len + 1} (inputs plus the shifted targets)"
        )
    return n


def lm_batch(tokens, batch_size: int, seq_len: int, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``tokens`` as int64 ``(x, y)`` of shape (batch_size, seq_len).

    A pure function of ``(seed, step)``: no generator state is carried between calls, so a
    resumed or re-run trial, and every candidate of a study, sees exactly the same batches.
    """
    n = _check_lm(tokens, batch_size, seq_len, "lm_batch: ")
    require_int("lm_batch: ", "step", step, 0)
    require_int("lm_batch: ", "seed", seed, 0)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))
    starts = rng.integers(0, n - seq_len, size=batch_size)
    return _windows(tokens, starts, seq_len)


def _windows(tokens, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    # One contiguous read per window: fancy indexing a memmap with a 2-D index would touch
    # the same pages but build a large index array first.
    rows = np.stack([np.asarray(tokens[s: s + seq_len + 1], dtype=np.int64) for s in starts.tolist()])
    block = torch.from_numpy(rows)
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()


def val_batches(
    tokens, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation windows: non-overlapping, and spread over the whole array when capped.

    Without a cap every window of the array is visited once (the last batch may be smaller).
    With ``max_batches``, ``max_batches * batch_size`` windows are taken evenly across the
    array rather than from its start, so a small budget still samples all of the val set.
    """
    n = _check_lm(tokens, batch_size, seq_len, "val_batches: ")
    if max_batches is not None:
        require_int("val_batches: ", "max_batches", max_batches, 1)
    n_windows = (n - 1) // seq_len
    picked = np.arange(n_windows)
    if max_batches is not None and max_batches * batch_size < n_windows:
        picked = np.unique(np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(np.int64))
    starts = picked * seq_len
    for i in range(0, len(starts), batch_size):
        yield _windows(tokens, starts[i: i + batch_size], seq_len)
