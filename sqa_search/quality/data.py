"""Data for the quality trials: text corpora, tokenisers, a token cache, LM batches and MQAR.

Two kinds of quality signal feed the search:

* **Language modelling** on real text. The default corpus is built from text that ships inside
  every Python installation, so a trial never downloads anything: the reference-manual topics
  (``pydoc_data.topics``), the docstrings and prose comments of the pure-Python standard
  library (read with ``ast``, never imported), and the docstrings of a fixed list of C modules.
  A user can bring a file, a folder or a Hugging Face dataset instead.
* **MQAR** (multi-query associative recall, Zoology, Arora et al. 2023): a synthetic task that
  separates attention variants by how well they retrieve; fewer query heads may hurt it first.

Text is tokenised once and cached on disk as a numpy memmap, keyed by what the tokens depend
on (source identity and its content fingerprint, tokenizer, split fraction, cache format), so
the many trials of a study share one copy and never re-tokenise.

Every batch function is a pure function of ``(seed, step)``: each candidate of a study sees the
same data in the same order, so differences in loss come from the architecture, not the data.

The builtin corpus depends on the Python installation (its version and its stdlib files): two
machines with different Pythons get slightly different corpora. The cache key includes the
Python version, and ``TokenData.cache_key`` lets a study record which corpus it used.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from ..errors import UserError

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

# torch.nn.functional.cross_entropy's default ignore_index.
IGNORE_INDEX = -100

# Bump when the builtin corpus recipe changes: the builtin source has no file to fingerprint,
# so this (with the Python version) is what invalidates cached tokens of an older recipe.
BUILTIN_CORPUS_VERSION = 1
# Bump when the on-disk layout of the token cache changes.
_CACHE_FORMAT = 1

DEFAULT_TEXT_EXTENSIONS: tuple[str, ...] = (".txt", ".md", ".rst", ".text", ".py")

_INSTALL_HF = "install with pip install 'sqa-search[hf]'"
_INSTALL_TOKENIZERS = "install with pip install 'sqa-search[tokenizers]'"


class DataError(UserError):
    """A data source, tokenizer or batch setting that cannot be used, raised before any work."""


def _require_int(owner: str, field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{owner}{field}={value!r} is not allowed: must be an integer")
    if value < low:
        raise DataError(f"{owner}{field}={value!r} is not allowed: must be >= {low}")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

SourceKind = Literal["builtin", "file", "folder", "hf"]
_KINDS = ("builtin", "file", "folder", "hf")
_SOURCE_FORMS = "'builtin', a path to a text file or folder, or 'hf:NAME[:CONFIG]'"


@dataclass(frozen=True)
class TextSource:
    """Where the text comes from.

    ``extensions`` filters a folder's files (case-insensitive); ``None`` takes every file that
    decodes as UTF-8. For ``hf``, ``path_or_name`` is a Hub name or a local folder (data files,
    or the output of ``Dataset.save_to_disk``); the one split is split again into train/val by
    document, so ``hf_split`` picks which split to read.
    """

    kind: SourceKind = "builtin"
    path_or_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_column: str = "text"
    extensions: tuple[str, ...] | None = DEFAULT_TEXT_EXTENSIONS

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise DataError(f"TextSource.kind={self.kind!r} is not allowed: choose one of {_KINDS}")
        if self.kind != "builtin" and not self.path_or_name:
            raise DataError(
                f"TextSource.path_or_name={self.path_or_name!r} is not allowed: "
                f"kind={self.kind!r} needs a {'dataset name' if self.kind == 'hf' else 'path'}"
            )
        if self.extensions is not None:
            if isinstance(self.extensions, str):  # a bare ".txt" would iterate per character
                object.__setattr__(self, "extensions", (self.extensions,))
            exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions)
            object.__setattr__(self, "extensions", exts)

    def describe(self) -> str:
        if self.kind == "builtin":
            return "builtin"
        if self.kind == "hf":
            cfg = f":{self.hf_config}" if self.hf_config else ""
            return f"hf:{self.path_or_name}{cfg}[{self.hf_split}].{self.text_column}"
        return str(self.path_or_name)


def parse_source(source: TextSource | str | os.PathLike | None) -> TextSource:
    """Turn the user's spelling of a source into a `TextSource`, checking it exists.

    Accepts ``None`` or ``"builtin"``, ``"hf:NAME[:CONFIG]"``, or a path to a file or folder.
    """
    if source is None:
        return TextSource("builtin")
    if isinstance(source, TextSource):
        return source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise DataError(f"data source {source!r} is not allowed: give {_SOURCE_FORMS}")
    if source == "builtin":
        return TextSource("builtin")
    if source.startswith("hf:"):
        # A Hub name never holds ':', so the first one after 'hf:' starts the config. A local
        # dataset folder whose path holds ':' needs TextSource("hf", path) instead.
        name, _, config = source[3:].partition(":")
        if not name:
            raise DataError(f"data source {source!r} is not allowed: 'hf:' needs a dataset name")
        return TextSource("hf", name, hf_config=config or None)
    path = Path(source).expanduser()
    if path.is_dir():
        return TextSource("folder", str(path))
    if path.exists():
        return TextSource("file", str(path))
    raise DataError(f"data source {source!r} is not allowed: no such file or folder; give {_SOURCE_FORMS}")


def _folder_files(source: TextSource) -> list[Path]:
    """The files a folder source reads: recursive, sorted, hidden entries skipped."""
    root = Path(source.path_or_name).expanduser()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes the walk order, so the corpus order is the same everywhere.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if source.extensions is not None and Path(name).suffix.lower() not in source.extensions:
                continue
            path = Path(dirpath) / name
            if path.is_file():
                files.append(path)
    # Sorted by path components, so a/z.md comes before b.txt as in a sorted listing.
    return sorted(files, key=lambda f: f.relative_to(root).parts)


def _check_source(source: TextSource) -> None:
    """Fail on a source that cannot give text, before any reading or tokenising."""
    if source.kind == "file":
        path = Path(source.path_or_name).expanduser()
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} is not allowed: it does not exist or is not a file")
        if path.stat().st_size == 0:
            raise DataError(f"data file {str(path)!r} is not allowed: it is empty; give a file with text")
    elif source.kind == "folder":
        path = Path(source.path_or_name).expanduser()
        if not path.is_dir():
            raise DataError(f"data folder {str(path)!r} is not allowed: it does not exist or is not a folder")
        files = [f for f in _folder_files(source) if f.stat().st_size > 0]
        if not files:
            which = (
                "no non-empty files" if source.extensions is None
                else f"no non-empty files with extensions {list(source.extensions)}"
            )
            raise DataError(
                f"data folder {str(path)!r} is not allowed: it has {which}; "
                "add text files or set TextSource.extensions=None to read every UTF-8 file"
            )
    elif source.kind == "hf":
        _import_datasets(source)


def _import_datasets(source: TextSource):
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(
            f"data source 'hf:{source.path_or_name}' is not allowed here: the Hugging Face "
            f"`datasets` package is not installed; {_INSTALL_HF}"
        ) from None
    return datasets


# ---------------------------------------------------------------------------------------------
# The builtin corpus
# ---------------------------------------------------------------------------------------------

# C modules whose docstrings add real prose (builtins alone documents str, list, dict...).
# A fixed list, not a directory listing: importing arbitrary extension modules can have side
# effects (readline writes to the terminal), and the corpus must not depend on what is lying
# around. Modules missing from an installation are skipped.
_C_MODULES = (
    "builtins", "sys", "math", "cmath", "itertools", "time", "gc", "marshal", "errno", "posix",
    "array", "binascii", "zlib", "select", "mmap", "unicodedata", "_io", "_socket", "_datetime",
    "_decimal", "_collections", "_functools", "_operator", "_pickle", "_json", "_csv", "_sre",
    "_struct", "_random", "_heapq", "_bisect", "_ssl", "_hashlib", "_sqlite3", "_thread",
    "_signal", "_asyncio", "_elementtree", "pyexpat", "_codecs", "_string", "_weakref", "_abc",
    "_lzma", "_bz2", "_statistics", "_queue", "_contextvars",
)

# Standard-library folders that hold no prose worth training on: tests, codec tables, the
# topics we already take from pydoc_data, bundled wheels, third-party packages.
_SKIP_DIRS = {
    "site-packages", "dist-packages", "__pycache__", "lib-dynload", "pydoc_data", "encodings",
    "ensurepip", "idle_test", "turtledemo",
}


def _stdlib_dir() -> Path:
    return Path(os.__file__).resolve().parent


def _is_prose(text: str) -> bool:
    # Keeps comment blocks that read as sentences; commented-out code and ASCII art fall out.
    if len(text) < 80 or len(text.split()) < 10:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) >= 0.85


_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _definitions(node: ast.AST) -> Iterator[ast.AST]:
    """Nodes that can carry a docstring, found through statement bodies only.

    ``ast.walk`` would also visit every expression node, which is most of a tree and most of
    the time; docstrings live only in module, class and function bodies (possibly nested in
    ``if``/``try``/``with`` blocks).
    """
    if isinstance(node, _DEFS):
        yield node
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, ()) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler, getattr(ast, "match_case", ast.stmt))):
                yield from _definitions(child)


def _module_prose(path: Path) -> str:
    """Docstrings and prose comment blocks of one source file, in source order."""
    raw = path.read_bytes()
    try:
        tree = ast.parse(raw)  # bytes: ast honours the file's coding cookie
    except (SyntaxError, ValueError):
        return ""
    pieces: list[tuple[int, str]] = []
    in_docstring: set[int] = set()
    for node in _definitions(tree):
        doc = ast.get_docstring(node, clean=True)
        if doc and node.body:
            first = node.body[0]
            pieces.append((first.lineno, doc))
            in_docstring.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    block: list[str] = []
    start = 0
    lines = raw.decode("utf-8", errors="replace").splitlines()
    for lineno, line in enumerate(lines + [""], start=1):
        stripped = line.strip()
        if stripped.startswith("#") and lineno not in in_docstring and not stripped.startswith("#!"):
            if not block:
                start = lineno
            block.append(stripped.lstrip("#").strip())
            continue
        if block:
            text = "\n".join(block).strip()
            if _is_prose(text):
                pieces.append((start, text))
            block = []
    pieces.sort(key=lambda p: p[0])
    return "\n\n".join(text for _, text in pieces)


def _c_module_docs(name: str) -> list[str]:
    try:
        module = importlib.import_module(name)
    except Exception:  # absent or broken in this build of Python: the corpus just lacks it
        return []

    # Only things that carry their own documentation: a plain value's __doc__ is its type's.
    def documented(obj) -> bool:
        return inspect.isclass(obj) or inspect.isroutine(obj) or inspect.isdatadescriptor(obj)

    docs = []
    objects = [module]
    for _, value in sorted(vars(module).items()):
        if not documented(value):
            continue
        objects.append(value)
        if inspect.isclass(value):
            objects.extend(v for _, v in sorted(vars(value).items()) if documented(v))
    for obj in objects:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and len(doc) >= 40:
            docs.append(inspect.cleandoc(doc))
    return docs


@functools.lru_cache(maxsize=1)
def _builtin_documents() -> tuple[str, ...]:
    """The builtin corpus: one document per reference topic, per C module, per stdlib file."""
    documents: list[str] = []
    seen: set[str] = set()  # license headers and shared docstrings repeat across files

    def unique(parts: Iterable[str]) -> str:
        kept = []
        for part in parts:
            if part and part not in seen:
                seen.add(part)
                kept.append(part)
        return "\n\n".join(kept)

    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data apart; the rest still works
        topics = {}
    for key in sorted(topics):
        documents.append(unique([topics[key].strip()]))
    for name in _C_MODULES:
        documents.append(unique(_c_module_docs(name)))
    root = _stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in _SKIP_DIRS and not d.startswith(("test", "config-", "."))
        )
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test"):
                prose = _module_prose(Path(dirpath) / name)
                documents.append(unique(prose.split("\n\n")) if prose else "")
    return tuple(d for d in documents if d.strip())


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


def _load_hf(source: TextSource):
    datasets = _import_datasets(source)
    name = source.path_or_name
    local = Path(name).expanduser()
    try:
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            # `save_to_disk` output is not loadable by load_dataset; it has its own reader.
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if source.hf_split not in ds:
                    raise DataError(
                        f"TextSource.hf_split={source.hf_split!r} is not allowed for {name!r}: "
                        f"the dataset has splits {sorted(ds)}"
                    )
                ds = ds[source.hf_split]
        else:
            ds = datasets.load_dataset(name, source.hf_config, split=source.hf_split)
    except DataError:
        raise
    except Exception as exc:  # the library raises many types; name the source in one error
        raise DataError(
            f"data source {source.describe()!r} could not be loaded by datasets "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    columns = list(ds.column_names)
    if source.text_column not in columns:
        raise DataError(
            f"TextSource.text_column={source.text_column!r} is not allowed for {name!r}: "
            f"the dataset has columns {columns}"
        )
    return ds


def _hf_fingerprint(ds) -> str:
    # `_fingerprint` hashes the dataset's content and processing; fall back to the files' stats.
    fp = getattr(ds, "_fingerprint", None)
    if fp:
        return str(fp)
    stats = []
    for f in getattr(ds, "cache_files", []) or []:
        st = os.stat(f["filename"])
        stats.append((f["filename"], st.st_size, st.st_mtime_ns))
    return json.dumps(stats)


def _iter_documents(source: TextSource, hf_dataset=None) -> Iterator[str]:
    if source.kind == "builtin":
        yield from _builtin_documents()
    elif source.kind == "file":
        path = Path(source.path_or_name).expanduser()
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"data file {str(path)!r} is not allowed: it is not UTF-8 text ({exc})") from None
    elif source.kind == "folder":
        for path in _folder_files(source):
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue  # binary files in a folder are expected; skip rather than fail
            if text.strip():
                yield text
    else:
        ds = hf_dataset if hf_dataset is not None else _load_hf(source)
        for batch in ds.iter(batch_size=1000):
            for text in batch[source.text_column]:
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(
                        f"TextSource.text_column={source.text_column!r} is not allowed: it holds "
                        f"{type(text).__name__} values, not text"
                    )
                if text.strip():
                    yield text


def load_text(source: TextSource | str | os.PathLike | None = None) -> list[str]:
    """The documents of a source, in a fixed order. Empty documents are dropped."""
    src = parse_source(source)
    _check_source(src)
    docs = list(_iter_documents(src))
    if not docs:
        raise DataError(f"data source {src.describe()!r} is not allowed: it holds no text")
    return docs


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Token cache
# ---------------------------------------------------------------------------------------------


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
    """``$SQA_SEARCH_CACHE/tokens``, else ``$XDG_CACHE_HOME/sqa_search/tokens``, else ``~/.cache/...``."""
    root = os.environ.get("SQA_SEARCH_CACHE")
    if root:
        return Path(root).expanduser() / "tokens"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sqa_search" / "tokens"


def _fingerprint(source: TextSource, hf_dataset=None) -> dict:
    """What the tokens of a source depend on, cheap to compute (stat, not read)."""
    if source.kind == "builtin":
        return {
            "kind": "builtin",
            "version": BUILTIN_CORPUS_VERSION,
            "python": sys.version,
            "stdlib": str(_stdlib_dir()),
        }
    if source.kind == "file":
        path = Path(source.path_or_name).expanduser().resolve()
        st = path.stat()
        return {"kind": "file", "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if source.kind == "folder":
        root = Path(source.path_or_name).expanduser().resolve()
        files = []
        for f in _folder_files(TextSource("folder", str(root), extensions=source.extensions)):
            st = f.stat()
            files.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
        return {"kind": "folder", "path": str(root), "extensions": source.extensions, "files": files}
    return {
        "kind": "hf",
        "name": source.path_or_name,
        "config": source.hf_config,
        "split": source.hf_split,
        "column": source.text_column,
        "fingerprint": _hf_fingerprint(hf_dataset),
    }


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
    _check_source(src)
    tok = get_tokenizer(tokenizer)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    hf_dataset = _load_hf(src) if src.kind == "hf" else None
    key_material = {
        "format": _CACHE_FORMAT,
        "source": _fingerprint(src, hf_dataset),
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
        docs = _iter_documents(src, hf_dataset)
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
    _require_int(where, "batch_size", batch_size, 1)
    _require_int(where, "seq_len", seq_len, 1)
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
    _require_int("lm_batch: ", "step", step, 0)
    _require_int("lm_batch: ", "seed", seed, 0)
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
        _require_int("val_batches: ", "max_batches", max_batches, 1)
    n_windows = (n - 1) // seq_len
    picked = np.arange(n_windows)
    if max_batches is not None and max_batches * batch_size < n_windows:
        picked = np.unique(np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(np.int64))
    starts = picked * seq_len
    for i in range(0, len(starts), batch_size):
        yield _windows(tokens, starts[i: i + batch_size], seq_len)


# ---------------------------------------------------------------------------------------------
# MQAR
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MQARConfig:
    """Multi-query associative recall, laid out as in Zoology (Arora et al. 2023).

    A sequence is ``n_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` followed by a query region of
    two-token slots. ``n_queries`` distinct keys from the context are placed at slots chosen
    with Zoology's power law (near slots likelier, ``power_a``); the target at a query key's
    position is that key's value, and ``IGNORE_INDEX`` everywhere else. Keys come from
    ``[1, vocab_size // 2)`` and values from ``[vocab_size // 2, vocab_size)``, so a value is
    never mistaken for a key; token 0 is the filler when ``random_fill`` is off. With
    ``random_fill`` (Zoology's default) the other positions hold random tokens of the whole
    vocabulary, so the model cannot find queries by looking for non-zero tokens.
    ``n_queries=None`` queries every pair, as Zoology does.
    """

    vocab_size: int = 8192
    seq_len: int = 256
    n_pairs: int = 16
    n_queries: int | None = None
    power_a: float = 0.01
    random_fill: bool = True

    def __post_init__(self):
        if self.n_queries is None:
            object.__setattr__(self, "n_queries", self.n_pairs)
        for field in ("vocab_size", "seq_len", "n_pairs", "n_queries"):
            _require_int("MQARConfig.", field, getattr(self, field), 1)
        if isinstance(self.power_a, bool) or not isinstance(self.power_a, (int, float)) or not self.power_a > 0:
            raise DataError(f"MQARConfig.power_a={self.power_a!r} is not allowed: must be a number > 0")
        p, q = self.n_pairs, self.n_queries
        if q > p:
            raise DataError(
                f"MQARConfig.n_queries={q} is not allowed: must be <= n_pairs={p}, "
                "because each query asks for a different key"
            )
        if 2 * p + 2 * q > self.seq_len:
            raise DataError(
                f"MQARConfig.seq_len={self.seq_len} is not allowed: n_pairs={p} pairs and "
                f"n_queries={q} queries need 2*n_pairs + 2*n_queries = {2 * p + 2 * q} positions"
            )
        n_keys, n_values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
        if min(n_keys, n_values) < p:
            raise DataError(
                f"MQARConfig.vocab_size={self.vocab_size} is not allowed: n_pairs={p} distinct keys "
                f"in [1, vocab_size//2) and distinct values in [vocab_size//2, vocab_size) need "
                f"vocab_size >= {2 * p + 2}"
            )


def _has_repeats(rows: np.ndarray) -> np.ndarray:
    ordered = np.sort(rows, axis=1)
    return (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)


def _sample_distinct(rng: np.random.Generator, batch: int, population: int, k: int) -> np.ndarray:
    """k distinct integers from [0, population) per row, in random order (vectorised)."""
    if k * k <= population:
        # Collisions are rare (birthday bound k^2 / 2N <= 1/2): draw with replacement and redraw
        # the rows that collide. Rejection keeps every ordered tuple of distinct values equally
        # likely, and costs O(k) per row instead of O(population) for the scoring below.
        out = rng.integers(0, population, size=(batch, k))
        bad = _has_repeats(out)
        while bad.any():
            out[bad] = rng.integers(0, population, size=(int(bad.sum()), k))
            bad = _has_repeats(out)
        return out
    scores = rng.random((batch, population))
    idx = np.argpartition(scores, k - 1, axis=1)[:, :k]
    # argpartition's order inside the first k is not random; sort by the random scores.
    order = np.argsort(np.take_along_axis(scores, idx, axis=1), axis=1)
    return np.take_along_axis(idx, order, axis=1)


def mqar_batch(config: MQARConfig, batch_size: int, seed: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, both int64 of shape (batch_size, seq_len); a pure function of
    ``(config, seed, step)``. Targets are ``IGNORE_INDEX`` except at query positions."""
    if not isinstance(config, MQARConfig):
        raise DataError(f"mqar_batch: config={config!r} is not allowed: must be an MQARConfig")
    _require_int("mqar_batch: ", "batch_size", batch_size, 1)
    _require_int("mqar_batch: ", "seed", seed, 0)
    _require_int("mqar_batch: ", "step", step, 0)
    b, v, L = batch_size, config.vocab_size, config.seq_len
    p, q = config.n_pairs, config.n_queries
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step)]))

    keys = _sample_distinct(rng, b, v // 2 - 1, p) + 1
    values = _sample_distinct(rng, b, v - v // 2, p) + v // 2
    asked = _sample_distinct(rng, b, p, q)  # which pairs are queried, in query order

    # Zoology's slot distribution: slot g (0-based) has weight (g+1)^(a-1); distinct slots
    # drawn with those weights via the Gumbel top-k trick, which is exact and vectorises.
    n_slots = (L - 2 * p) // 2
    log_w = (config.power_a - 1.0) * np.log(np.arange(1, n_slots + 1, dtype=np.float64))
    gumbel = -np.log(-np.log(rng.random((b, n_slots)).clip(1e-300, 1.0 - 1e-16)))
    slots = np.argpartition(-(log_w + gumbel), q - 1, axis=1)[:, :q]
    positions = 2 * p + 2 * slots

    if config.random_fill:
        inputs = rng.integers(0, v, size=(b, L), dtype=np.int64)
    else:
        inputs = np.zeros((b, L), dtype=np.int64)
    inputs[:, 0: 2 * p: 2] = keys
    inputs[:, 1: 2 * p: 2] = values
    np.put_along_axis(inputs, positions, np.take_along_axis(keys, asked, axis=1), axis=1)
    targets = np.full((b, L), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(targets, positions, np.take_along_axis(values, asked, axis=1), axis=1)
    return torch.from_numpy(inputs), torch.from_numpy(targets)
