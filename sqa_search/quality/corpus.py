"""Where the text of the language-modelling task comes from: a file, a folder, a Hugging Face
dataset, or the builtin corpus.

The builtin corpus is built from text that ships inside every Python installation, so a trial
never downloads anything: the reference-manual topics (``pydoc_data.topics``), the docstrings
and prose comments of the pure-Python standard library (read with ``ast``, never imported), and
the docstrings of a fixed list of C modules. It depends on the Python installation (its version
and its stdlib files): two machines with different Pythons get slightly different corpora, which
is why `source_fingerprint` names the Python version.

`load_text` gives a source's documents; the token cache (`sqa_search.quality.tokens`) reads them
through `check_source`, `open_hf_dataset`, `iter_documents` and `source_fingerprint`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

from .errors import DataError

__all__ = [
    "TextSource",
    "parse_source",
    "load_text",
    "check_source",
    "open_hf_dataset",
    "iter_documents",
    "source_fingerprint",
    "DEFAULT_TEXT_EXTENSIONS",
    "BUILTIN_CORPUS_VERSION",
]

# Bump when the builtin corpus recipe changes: the builtin source has no file to fingerprint,
# so this (with the Python version) is what invalidates cached tokens of an older recipe.
BUILTIN_CORPUS_VERSION = 1

DEFAULT_TEXT_EXTENSIONS: tuple[str, ...] = (".txt", ".md", ".rst", ".text", ".py")

_INSTALL_HF = "install with pip install 'sqa-search[hf]'"


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


def check_source(source: TextSource) -> None:
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


def open_hf_dataset(source: TextSource):
    """The Hugging Face dataset (one split) of an ``hf`` source, checked to have its text column."""
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


def iter_documents(source: TextSource, hf_dataset=None) -> Iterator[str]:
    """A source's documents in a fixed order; ``hf_dataset`` spares opening an ``hf`` source twice."""
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
        ds = hf_dataset if hf_dataset is not None else open_hf_dataset(source)
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
    check_source(src)
    docs = list(iter_documents(src))
    if not docs:
        raise DataError(f"data source {src.describe()!r} is not allowed: it holds no text")
    return docs


def source_fingerprint(source: TextSource, hf_dataset=None) -> dict:
    """What the text of a source depends on, cheap to compute (stat, not read): the token
    cache's key names it, so a changed file or a newer Python gives fresh tokens."""
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
