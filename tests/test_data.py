"""Tests for the data of the quality trials (corpus, tokenizer, tokens, mqar): real text, real files,
no network, no mocks of our own code."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from sqa_search.quality import tokens as token_cache
from sqa_search.quality.corpus import TextSource, load_text, parse_source
from sqa_search.quality.errors import DataError
from sqa_search.quality.mqar import IGNORE_INDEX, MQARConfig, mqar_batch
from sqa_search.quality.tokenizer import Tokenizer, get_tokenizer
from sqa_search.quality.tokens import lm_batch, load_tokens, val_batches

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. It is a sentence that uses every letter of the "
    "alphabet, and typists have practised with it for more than a century.\n"
)


def _write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- builtin corpus ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_docs():
    return load_text("builtin")


@pytest.fixture(scope="module")
def builtin_tokens(tmp_path_factory):
    return load_tokens("builtin", cache_dir=tmp_path_factory.mktemp("cache"))


def test_builtin_corpus_is_real_english_text(builtin_docs):
    total = sum(len(d.encode("utf-8")) for d in builtin_docs)
    assert len(builtin_docs) > 300
    assert total > 1_500_000  # ~3 MB on CPython 3.11; leave room for other versions
    text = " ".join(builtin_docs[:200]).lower()
    words = text.split()
    # Common English function words make up a large share of any English prose.
    common = sum(w in {"the", "a", "of", "to", "is", "and", "in", "if", "an", "be"} for w in words)
    assert common / len(words) > 0.08
    assert any("assignment statement" in d for d in builtin_docs)  # a reference-manual topic
    assert load_text(None) == builtin_docs  # same order every call


def test_builtin_split_is_deterministic_and_disjoint(builtin_docs, builtin_tokens, tmp_path):
    td = builtin_tokens
    assert td.vocab_size == 256 and td.split == "document" and td.tokenizer == "byte"
    assert td.train.dtype == np.uint16
    n = len(td.train) + len(td.val)
    assert 0.02 < len(td.val) / n < 0.1
    # A second build in a fresh cache gives the same tokens, bit for bit.
    again = load_tokens("builtin", cache_dir=tmp_path)
    assert not again.from_cache
    assert np.array_equal(again.train, td.train) and np.array_equal(again.val, td.val)
    # Each long document sits wholly on one side and never on the other.
    train_bytes, val_bytes = td.train.astype(np.uint8).tobytes(), td.val.astype(np.uint8).tobytes()
    val_docs = [d for d in builtin_docs if token_cache._is_val(d, 0.05) and len(d) > 300][:5]
    train_docs = [d for d in builtin_docs if not token_cache._is_val(d, 0.05) and len(d) > 300][:5]
    assert val_docs and train_docs
    for d in val_docs:
        assert d.encode() in val_bytes and d.encode() not in train_bytes
    for d in train_docs:
        assert d.encode() in train_bytes and d.encode() not in val_bytes


# --- tokenizers ----------------------------------------------------------------------------


def test_byte_tokenizer_round_trips():
    tok = get_tokenizer("byte")
    assert tok.vocab_size == 256 and tok.name == "byte" and tok.dtype == np.uint16
    text = "naïve café — 東京 🙂\n" + ENGLISH
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.max() < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids)) == text


def test_tokenizers_json_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([ENGLISH] * 20, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))
    path = tmp_path / "tokenizer.json"
    tk.save(str(path))

    tok = get_tokenizer(str(path))
    assert tok.vocab_size == tk.get_vocab_size() and tok.name.startswith("tokenizers:")
    ids = tok.encode("the quick brown fox")
    assert tok.decode(ids).replace(" ", "") == "thequickbrownfox"
    src = _write(tmp_path / "a.txt", ENGLISH * 30)
    td = load_tokens(src, tokenizer=str(path), cache_dir=tmp_path / "cache")
    assert td.vocab_size == tok.vocab_size and td.train.dtype == np.uint16
    assert int(td.train.max()) < tok.vocab_size


def test_tiktoken_encoding_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"tiktoken:cl100k_base.*not available offline"):
        get_tokenizer("tiktoken:cl100k_base")
    with pytest.raises(DataError, match=r"tiktoken:nope.*unknown.*cl100k_base"):
        get_tokenizer("tiktoken:nope")


# --- cache ---------------------------------------------------------------------------------


def test_cache_is_reused_and_invalidated_when_the_file_changes(tmp_path):
    cache = tmp_path / "cache"
    src = _write(tmp_path / "book.txt", ENGLISH * 100)
    first = load_tokens(src, cache_dir=cache)
    assert not first.from_cache and first.split == "tail"
    meta = cache / f"book.txt-{first.cache_key}.json"
    stamp = meta.stat().st_mtime_ns

    second = load_tokens(src, cache_dir=cache)
    assert second.from_cache and second.cache_key == first.cache_key
    assert meta.stat().st_mtime_ns == stamp  # not rewritten
    assert np.array_equal(second.train, first.train)

    _write(tmp_path / "book.txt", ENGLISH * 100 + "A new closing line.\n")
    third = load_tokens(src, cache_dir=cache)
    assert not third.from_cache and third.cache_key != first.cache_key
    assert len(third.train) + len(third.val) == len(first.train) + len(first.val) + len("A new closing line.\n")

    # A different tokenizer or val fraction is a different cache entry too.
    assert load_tokens(src, cache_dir=cache, val_fraction=0.1).cache_key != third.cache_key
    # Only complete entries are left: no temporary files.
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SQA_SEARCH_CACHE", str(tmp_path / "root"))
    assert token_cache.default_cache_dir() == tmp_path / "root" / "tokens"
    src = _write(tmp_path / "a.txt", ENGLISH * 10)
    td = load_tokens(src)
    assert (tmp_path / "root" / "tokens" / f"a.txt-{td.cache_key}.json").exists()


def test_a_crash_while_tokenising_leaves_no_partial_cache(tmp_path):
    folder = tmp_path / "many"
    for i in range(600):  # more than one encode chunk
        _write(folder / f"{i:04d}.txt", f"document {i}. " + ENGLISH)
    calls = []

    def encode_batch(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return [np.frombuffer(t.encode(), dtype=np.uint8) for t in texts]

    flaky = Tokenizer("flaky", 256, encode_batch, lambda ids: bytes(ids).decode())
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_tokens(str(folder), tokenizer=flaky, cache_dir=cache)
    assert list(cache.iterdir()) == []
    assert load_tokens(str(folder), cache_dir=cache).split == "document"


# --- file, folder and Hugging Face sources -------------------------------------------------


def test_file_source(tmp_path):
    src = _write(tmp_path / "notes.md", ENGLISH)
    assert parse_source(src) == TextSource("file", src)
    assert load_text(src) == [ENGLISH]
    td = load_tokens(src, cache_dir=tmp_path / "c", val_fraction=0.25)
    n = len(ENGLISH.encode()) + 2  # the document separator
    assert len(td.val) == round(n * 0.25) and len(td.train) + len(td.val) == n
    whole = get_tokenizer().decode(np.concatenate([td.train, td.val]))
    assert whole == ENGLISH + "\n\n"


def test_folder_source_recursive_sorted_and_filtered(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "b.txt", "bravo text")
    _write(root / "a" / "z.md", "alpha nested markdown")
    _write(root / "c.rst", "charlie rst")
    _write(root / "data.csv", "not,taken,by,default")
    _write(root / ".hidden.txt", "hidden")
    _write(root / ".git" / "x.txt", "inside git")
    (root / "blob.bin").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]))
    assert parse_source(str(root)).kind == "folder"
    assert load_text(str(root)) == ["alpha nested markdown", "bravo text", "charlie rst"]
    every = TextSource("folder", str(root), extensions=None)  # all UTF-8 files; binary skipped
    assert load_text(every) == ["alpha nested markdown", "bravo text", "charlie rst", "not,taken,by,default"]
    assert load_text(TextSource("folder", str(root), extensions=("csv",))) == ["not,taken,by,default"]


def test_hf_local_dataset_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "hfdata"
    folder.mkdir()
    rows = [{"body": f"Row {i}: " + ENGLISH, "id": i} for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    src = TextSource("hf", str(folder), text_column="body")
    assert load_text(src) == [r["body"] for r in rows]
    cache = tmp_path / "cache"
    td = load_tokens(src, cache_dir=cache)
    assert td.source.startswith("hf:") and len(td.train) > len(td.val) > 0
    assert load_tokens(src, cache_dir=cache).from_cache

    with pytest.raises(DataError, match=r"text_column='text'.*columns \['body', 'id'\]"):
        load_text(TextSource("hf", str(folder)))


def test_hf_saved_dataset_and_string_form(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": [ENGLISH, "second document", None, "   "]}).save_to_disk(str(saved))
    assert parse_source(f"hf:{saved}") == TextSource("hf", str(saved))
    assert load_text(f"hf:{saved}") == [ENGLISH, "second document"]


# --- LM batches ----------------------------------------------------------------------------


def test_lm_batch_is_deterministic_and_shifted():
    tokens = np.arange(10_000, dtype=np.uint16) % 251
    x, y = lm_batch(tokens, batch_size=4, seq_len=32, step=3, seed=7)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = lm_batch(tokens, batch_size=4, seq_len=32, step=3, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, lm_batch(tokens, 4, 32, step=3, seed=8)[0])
    assert not torch.equal(x, lm_batch(tokens, 4, 32, step=4, seed=7)[0])
    # Every start is reachable, including the last full window.
    starts = {int(lm_batch(tokens[:40], 8, 32, s, 0)[0][i, 0]) for s in range(50) for i in range(8)}
    assert starts == set(range(8))


def test_lm_batch_on_real_tokens(builtin_tokens):
    x, y = lm_batch(builtin_tokens.train, 8, 128, step=0, seed=0)
    assert int(x.max()) < 256 and x.shape == (8, 128)
    text = get_tokenizer().decode(x[0])
    assert sum(c.isalpha() for c in text) > 40


def test_val_batches_fixed_and_capped():
    tokens = np.arange(1001, dtype=np.uint16)
    full = list(val_batches(tokens, batch_size=4, seq_len=10))
    assert sum(len(x) for x, _ in full) == 100  # (1001 - 1) // 10 windows
    starts = torch.cat([x[:, 0] for x, _ in full])
    assert torch.equal(starts, torch.arange(0, 1000, 10))
    assert torch.equal(full[0][1][:, -1], full[0][0][:, -1] + 1)
    capped = list(val_batches(tokens, batch_size=4, seq_len=10, max_batches=2))
    assert len(capped) == 2
    cstarts = torch.cat([x[:, 0] for x, _ in capped])
    assert int(cstarts[0]) == 0 and int(cstarts[-1]) == 990  # spread over the whole array
    again = list(val_batches(tokens, 4, 10, max_batches=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(capped, again, strict=True))


# --- MQAR ----------------------------------------------------------------------------------


# A small vocabulary (keys drawn by scoring the whole range) and a large one (keys drawn with
# replacement and collisions redrawn): the two sampling paths must give the same guarantees.
@pytest.mark.parametrize("vocab_size", [64, 8192])
def test_mqar_targets_are_the_values_of_the_queried_keys(vocab_size):
    cfg = MQARConfig(vocab_size=vocab_size, seq_len=64, n_pairs=8, n_queries=5)
    inputs, targets = mqar_batch(cfg, batch_size=300, seed=3)
    assert inputs.shape == targets.shape == (300, 64)
    assert inputs.dtype == targets.dtype == torch.int64
    half = cfg.vocab_size // 2
    for row_in, row_t in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = row_in[0:16:2], row_in[1:16:2]
        assert all(1 <= k < half for k in keys) and all(half <= v < vocab_size for v in values)
        assert len(set(keys)) == 8 and len(set(values)) == 8
        pairs = dict(zip(keys, values, strict=True))
        asked = [i for i, t in enumerate(row_t) if t != IGNORE_INDEX]
        assert len(asked) == 5 and all(i >= 16 and i % 2 == 0 for i in asked)
        assert len({row_in[i] for i in asked}) == 5  # distinct keys queried
        for i in asked:
            assert row_in[i] in pairs and row_t[i] == pairs[row_in[i]]


def test_mqar_is_deterministic_and_fills_like_zoology():
    cfg = MQARConfig(vocab_size=128, seq_len=128, n_pairs=16)
    assert cfg.n_queries == 16
    a, b = mqar_batch(cfg, 32, seed=1), mqar_batch(cfg, 32, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], mqar_batch(cfg, 32, seed=2)[0])
    assert not torch.equal(a[0], mqar_batch(cfg, 32, seed=1, step=1)[0])
    assert ((a[1] != IGNORE_INDEX).sum(1) == 16).all()
    zeros = MQARConfig(vocab_size=128, seq_len=128, n_pairs=16, random_fill=False)
    inputs, targets = mqar_batch(zeros, 8, seed=0)
    assert ((inputs[:, 32:] != 0) == (targets[:, 32:] != IGNORE_INDEX)).all()
    # Power law: queries sit nearer the context than a uniform draw would put them.
    positions = (mqar_batch(MQARConfig(8192, 512, 8, 8), 256, 0)[1] != IGNORE_INDEX).nonzero()[:, 1]
    assert positions.float().mean() < 16 + (512 - 16) / 2


def test_mqar_is_fast():
    cfg = MQARConfig(vocab_size=8192, seq_len=256, n_pairs=32)
    mqar_batch(cfg, 16, seed=0)
    start = time.perf_counter()
    mqar_batch(cfg, 4096, seed=0)
    assert time.perf_counter() - start < 3.0  # ~0.1 s on a quiet CPU: tens of thousands a second


# --- bad input -----------------------------------------------------------------------------


def test_missing_empty_and_unreadable_sources(tmp_path):
    with pytest.raises(DataError, match=r"data source '.*nowhere.txt'.*no such file or folder.*builtin"):
        load_tokens(str(tmp_path / "nowhere.txt"), cache_dir=tmp_path / "c")
    empty = tmp_path / "empty.txt"
    empty.touch()
    with pytest.raises(DataError, match=r"data file '.*empty.txt'.*empty"):
        load_tokens(str(empty), cache_dir=tmp_path / "c")
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match=r"data folder '.*void'.*no non-empty files with extensions"):
        load_tokens(str(tmp_path / "void"), cache_dir=tmp_path / "c")
    _write(tmp_path / "csvs" / "x.csv", "a,b")
    with pytest.raises(DataError, match=r"data folder '.*csvs'.*extensions=None"):
        load_text(str(tmp_path / "csvs"))
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"data file '.*latin.txt'.*not UTF-8"):
        load_text(str(tmp_path / "latin.txt"))
    with pytest.raises(DataError, match=r"TextSource.kind='web'"):
        TextSource("web", "x")
    with pytest.raises(DataError, match=r"TextSource.path_or_name=None.*kind='file' needs a path"):
        TextSource("file")
    with pytest.raises(DataError, match=r"'hf:' needs a dataset name"):
        parse_source("hf:")
    assert not (tmp_path / "c").exists()  # nothing was started


def test_hf_source_without_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"hf:wikitext.*datasets.*pip install 'sqa-search\[hf\]'"):
        load_tokens("hf:wikitext:wikitext-2-raw-v1", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_bad_tokenizers(tmp_path, monkeypatch):
    src = _write(tmp_path / "a.txt", ENGLISH)
    with pytest.raises(DataError, match=r"tokenizer 'gpt-5' is unknown.*'byte'.*tiktoken:ENCODING.*tokenizer.json"):
        load_tokens(src, tokenizer="gpt-5", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"tokenizer '.*missing.json'.*no such tokenizer.json"):
        get_tokenizer(str(tmp_path / "missing.json"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as on a machine without the package
    present = _write(tmp_path / "tokenizer.json", "{}")
    with pytest.raises(DataError, match=r"tokenizers package.*sqa-search\[tokenizers\]"):
        get_tokenizer(f"tokenizers:{present}")
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(DataError, match=r"tiktoken package.*sqa-search\[tokenizers\]"):
        get_tokenizer("tiktoken:gpt2")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(n_pairs=8, n_queries=9, seq_len=64), r"n_queries=9.*<= n_pairs=8"),
        (dict(n_pairs=16, n_queries=16, seq_len=60), r"seq_len=60.*2\*n_pairs \+ 2\*n_queries = 64"),
        (dict(vocab_size=30, n_pairs=16, seq_len=128), r"vocab_size=30.*distinct keys.*vocab_size >= 34"),
        (dict(n_pairs=0), r"n_pairs=0.*>= 1"),
        (dict(vocab_size=2.5), r"vocab_size=2.5.*integer"),
        (dict(power_a=0), r"power_a=0.*> 0"),
    ],
)
def test_mqar_settings_that_cannot_fit(kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        MQARConfig(**kwargs)


def test_bad_batch_settings():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(DataError, match=r"seq_len=100.*100 tokens.*101"):
        lm_batch(tokens, 2, 100, 0, 0)
    with pytest.raises(DataError, match=r"batch_size=0.*>= 1"):
        lm_batch(tokens, 0, 10, 0, 0)
    with pytest.raises(DataError, match=r"seed=-1.*>= 0"):
        lm_batch(tokens, 2, 10, 0, -1)
    with pytest.raises(DataError, match=r"max_batches=0.*>= 1"):
        list(val_batches(tokens, 2, 10, max_batches=0))
    with pytest.raises(DataError, match=r"val_fraction=1.5.*\(0, 1\)"):
        load_tokens("builtin", val_fraction=1.5)
    with pytest.raises(DataError, match=r"batch_size=0"):
        mqar_batch(MQARConfig(), 0, 0)


def test_too_little_text_to_split(tmp_path):
    src = _write(tmp_path / "one.txt", "x")
    # "x" plus the separator is 3 tokens: still splittable at val_fraction=0.05 (1 val token).
    assert len(load_tokens(src, cache_dir=tmp_path / "c").val) == 1
    ws = tmp_path / "ws"
    _write(ws / "a.txt", "   \n\n ")
    with pytest.raises(DataError, match=r"holds no text"):
        load_tokens(str(ws), cache_dir=tmp_path / "c")
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".tmp")]
