"""sqa_search.common: the one cache-root rule, the out-of-memory test, the device name."""

from __future__ import annotations

import subprocess
import sys

import torch

from sqa_search.common import DTYPE_BYTES, cache_dir, cache_root, is_oom, resolve_device_name


# ----- cache_root / cache_dir: $SQA_SEARCH_CACHE, else $XDG_CACHE_HOME/sqa_search, else ~/.cache ----
def test_sqa_search_cache_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("SQA_SEARCH_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # set too, and ignored
    assert cache_root() == tmp_path / "mine"
    assert cache_dir("tokens") == tmp_path / "mine" / "tokens"
    assert cache_dir("timings") == tmp_path / "mine" / "timings"


def test_xdg_cache_home_when_sqa_search_cache_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("SQA_SEARCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "sqa_search"
    assert cache_dir("profiles") == tmp_path / "xdg" / "sqa_search" / "profiles"


def test_home_cache_when_neither_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("SQA_SEARCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # what Path.home() reads on POSIX
    assert cache_root() == tmp_path / "home" / ".cache" / "sqa_search"
    assert cache_dir("tokens") == tmp_path / "home" / ".cache" / "sqa_search" / "tokens"


def test_an_empty_variable_counts_as_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("SQA_SEARCH_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "sqa_search"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "sqa_search"


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SQA_SEARCH_CACHE", "~/caches/sqa")
    assert cache_root() == tmp_path / "home" / "caches" / "sqa"
    monkeypatch.delenv("SQA_SEARCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert cache_root() == tmp_path / "home" / "xdg" / "sqa_search"


def test_the_environment_is_read_at_each_call_and_the_folder_is_usable(tmp_path, monkeypatch):
    monkeypatch.setenv("SQA_SEARCH_CACHE", str(tmp_path / "first"))
    first = cache_dir("tokens")
    monkeypatch.setenv("SQA_SEARCH_CACHE", str(tmp_path / "second"))
    second = cache_dir("tokens")
    assert (first, second) == (tmp_path / "first" / "tokens", tmp_path / "second" / "tokens")
    # cache_dir only names the folder; a caller creates it, and it is a real, writable place
    assert not second.exists()
    second.mkdir(parents=True)
    (second / "probe.txt").write_text("ok")
    assert (tmp_path / "second" / "tokens" / "probe.txt").read_text() == "ok"


def test_the_token_cache_follows_the_shared_rule(tmp_path, monkeypatch):
    from sqa_search.quality.tokens import default_cache_dir

    monkeypatch.delenv("SQA_SEARCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == cache_dir("tokens") == tmp_path / "xdg" / "sqa_search" / "tokens"


# ----- is_oom, on exceptions really raised -----------------------------------------------------
def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the point is to capture whatever it raises
        return exc
    raise AssertionError(f"{fn} raised nothing")


def test_memory_error_is_oom():
    exc = _raised(lambda: bytearray(2**62))  # Python's allocator refuses 4 EiB
    assert isinstance(exc, MemoryError)
    assert is_oom(exc)


def test_cpu_allocator_failure_is_oom():
    exc = _raised(lambda: torch.empty(2**62, dtype=torch.uint8))  # "can't allocate memory"
    assert type(exc) is RuntimeError
    assert is_oom(exc)


def test_cuda_out_of_memory_message_is_oom():
    def cuda_like():
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.15 GiB total capacity)")

    assert is_oom(_raised(cuda_like))


def test_torch_out_of_memory_error_is_oom():
    def torch_oom():
        raise torch.OutOfMemoryError("Tried to allocate 2.00 GiB")  # no "out of memory" in the text

    assert is_oom(_raised(torch_oom))


def test_other_errors_are_not_oom():
    def plain():
        raise RuntimeError("shape mismatch")

    shapes = _raised(lambda: torch.ones(2, 3) @ torch.ones(2, 3))  # torch's own plain RuntimeError
    assert type(shapes) is RuntimeError and not is_oom(shapes)
    assert not is_oom(_raised(plain))
    # the words alone do not make an OOM: only a RuntimeError (or MemoryError) is one
    assert not is_oom(ValueError("out of memory"))
    assert not is_oom(KeyError("can't allocate memory"))


# ----- small shared facts -----------------------------------------------------------------------
def test_dtype_bytes():
    assert DTYPE_BYTES == {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
    for name, size in DTYPE_BYTES.items():
        assert torch.tensor([], dtype=getattr(torch, name)).element_size() == size


def test_resolve_device_name():
    assert resolve_device_name("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("cpu", "cuda", "cuda:1"):
        assert resolve_device_name(name) == name


def test_module_stays_light():
    """common is imported by every package, the CLI's start included: no torch at import."""
    code = "import sys, sqa_search.common; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
