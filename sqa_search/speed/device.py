"""Where and in what precision a timing runs: device and dtype names checked and resolved.

The harness, the fingerprint and bench all read a user's ``--device``/``--dtype`` through these
two functions, so an unknown name fails the same way everywhere.
"""

from __future__ import annotations

import torch

from ..common import resolve_device_name
from ..errors import UserError


__all__ = ["TimingError", "parse_dtype", "resolve_device"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class TimingError(UserError):
    """A timing request that cannot be run as asked (bad mode, dtype, device, shape)."""


def parse_dtype(dtype) -> tuple[str, torch.dtype]:
    """'bf16' -> ('bfloat16', torch.bfloat16); raises TimingError naming the allowed ones."""
    if isinstance(dtype, torch.dtype):
        for value in _DTYPES.values():
            if value == dtype:
                return str(value).replace("torch.", ""), value
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise TimingError(f"dtype={dtype!r} is not known: choose one of float32, bfloat16, float16")
    value = _DTYPES[key]
    return str(value).replace("torch.", ""), value


def resolve_device(device) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' -> 'cuda:<current>'; checks availability."""
    text = resolve_device_name(str(device).lower())
    try:
        dev = torch.device(text)
    except RuntimeError as exc:
        raise TimingError(f"device={device!r} is not a device: use auto, cpu, cuda or cuda:<index>") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TimingError(f"device={device!r} asked for, but CUDA is not available on this machine")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise TimingError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise TimingError(f"device={device!r} is not supported: use auto, cpu, cuda or cuda:<index>")
    return dev
