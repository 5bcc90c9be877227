"""The hardware: the machine a timing ran on and the profiles the cost model predicts for.

A `Fingerprint` (made by `fingerprint`) holds what a timing depends on besides its shape (device,
software, CPU, threads, dtype) and no hostnames or serial numbers: two identical machines share
one, which is the point (timings transfer between them). Its `id` hashes the hardware and
software fields only, so one id groups every timing taken on one machine, whatever the thread
count or dtype.

A `HardwareProfile` holds a device's datasheet figures plus efficiency factors and an overhead
(guessed, or fitted by `sqa_search.speed.calibrate`). Profile lookup (`load_profile`): a path
loads that file. A name looks first in the user calibration directory
(``common.cache_dir("profiles")``), where `save_profile` writes calibrated profiles, then among
the profiles shipped with the package (``sqa_search/speed/profiles``). A calibrated profile of the
same name therefore wins over the datasheet one; ``load_profile(name, calibrated=False)`` gets
the shipped figures.

Nothing here imports torch at import time (`fingerprint` asks it when called): the cost model
and ``sqa-search --help`` stay light.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import yaml

from ..common import cache_dir
from ..errors import UserError

__all__ = ["Fingerprint", "fingerprint", "HardwareProfile", "CostError", "list_profiles", "load_profile",
           "save_profile", "user_profile_dir", "plain", "EFFICIENCY_KEYS", "PEAK_KEYS", "DEVICE_TYPES"]


class CostError(UserError):
    """Bad input to the cost model: an unknown profile, mode, dtype or scope, or a bad profile file."""


EFFICIENCY_KEYS = ("matmul", "attention", "elementwise", "memory")
PEAK_KEYS = ("fp32", "tf32", "bf16", "fp16")
DEVICE_TYPES = ("cuda", "cpu")

# the fields `id` hashes; threads and dtype are left out on purpose (each timing's key carries them)
HARDWARE_FIELDS = (
    "device_type",
    "device_name",
    "compute_capability",
    "gpu_memory_bytes",
    "sm_count",
    "driver_version",
    "cuda_version",
    "torch_version",
    "cpu_model",
    "cpu_count",
)


@dataclass(frozen=True)
class Fingerprint:
    device_type: str = "cpu"
    device_name: str | None = None
    compute_capability: str | None = None
    gpu_memory_bytes: int | None = None
    sm_count: int | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    torch_version: str | None = None
    cpu_model: str | None = None
    cpu_count: int | None = None
    python_version: str | None = None
    os: str | None = None
    l2_cache_bytes: int | None = None
    threads: int | None = None
    dtype: str | None = None

    @property
    def id(self) -> str:
        """A short stable hash of HARDWARE_FIELDS (the same value studies and caches stored before)."""
        blob = json.dumps({k: getattr(self, k) for k in HARDWARE_FIELDS}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """'NVIDIA H200, 1 thread' / 'AMD EPYC, 2 threads': what a person reads next to a figure."""
        name = self.device_name or self.cpu_model or "unknown device"
        if self.device_type == "cpu" and self.threads:
            return f"{name}, {self.threads} thread{'s' if self.threads != 1 else ''}"
        return name

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Fingerprint":
        """A stored fingerprint; unknown keys (a newer version's) are ignored on purpose."""
        if isinstance(data, Fingerprint):
            return data
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


# ----- this machine's fingerprint -------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _driver_version() -> str | None:
    """NVIDIA driver version from nvidia-smi, else the CUDA driver API version (best effort)."""
    import torch  # lazy: see the module docstring

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        v = int(torch._C._cuda_getDriverVersion())
        return f"cuda-driver-api {v // 1000}.{(v % 1000) // 10}"
    except Exception:
        return None


_MACHINE: dict = {}  # str(device) -> the fields that do not change within a process


def _machine(dev) -> dict:
    import torch  # lazy: see the module docstring

    key = str(dev)
    if key not in _MACHINE:
        fp = {"device_type": dev.type, "cuda_version": torch.version.cuda, "torch_version": torch.__version__,
              "cpu_model": _cpu_model(), "cpu_count": _cpu_count(),
              "python_version": platform.python_version(), "os": platform.system()}
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            fp.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                      gpu_memory_bytes=int(props.total_memory), sm_count=int(props.multi_processor_count),
                      l2_cache_bytes=int(getattr(props, "L2_cache_size", 0)) or None,
                      driver_version=_driver_version())
        else:
            fp["device_name"] = fp["cpu_model"]
        _MACHINE[key] = fp
    return _MACHINE[key]


def fingerprint(device="cpu", dtype="float32", threads: int | None = None) -> Fingerprint:
    """This machine as a timing on `device` with `dtype` and `threads` sees it (threads None:
    torch's current setting). Raises `sqa_search.speed.device.TimingError` for a device or dtype
    that cannot be used here."""
    import torch  # lazy: see the module docstring

    from .device import parse_dtype, resolve_device

    dev = resolve_device(device)
    dtype_name, _ = parse_dtype(dtype)
    used = threads if threads is not None else torch.get_num_threads()
    return Fingerprint(**_machine(dev), threads=used, dtype=dtype_name)


_SHIPPED_DIR = Path(__file__).resolve().parent / "profiles"
_ALIASES = {
    "a100": "a100-80gb",
    "a100-40g": "a100-40gb",
    "a100-80g": "a100-80gb",
    "h100": "h100-sxm",
    "h100-sxm5": "h100-sxm",
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
    "cpu": "cpu-generic",
}



# ----- hardware profiles -----------------------------------------------------------------------
@dataclass
class HardwareProfile:
    """A device's datasheet figures plus efficiency factors and overhead (guessed or calibrated).

    peak_flops: dense FLOP/s per dtype key (fp32 = non-Tensor-Core vector rate, tf32, bf16,
    fp16). mem_bandwidth: bytes/s. efficiency: fraction of peak reached per kind (matmul,
    attention, elementwise) and of bandwidth (memory); calibrated values may exceed 1 where
    data stays in cache. overhead_s: seconds per kernel launch / eager op. sources: where each
    figure comes from. calibration: None, or what the factors were fitted on.
    """

    name: str
    display_name: str
    peak_flops: dict
    mem_bandwidth: float
    mem_bytes: float
    l2_bytes: float
    efficiency: dict
    overhead_s: float
    sources: dict
    calibration: dict | None = None
    device_type: str = "cuda"
    attention_tile: int = 128

    @property
    def calibration_label(self) -> str:
        cal = self.calibration
        if not cal:
            return "uncalibrated datasheet figures"
        mape = cal.get("heldout_mape")
        mape_text = "n/a" if mape is None or not math.isfinite(mape) else f"{100 * mape:.1f}%"
        return (f"calibrated on {cal.get('fingerprint', 'unknown device')} {cal.get('date', '?')}, "
                f"{cal.get('n_points', '?')} points, held-out MAPE {mape_text}")

    @property
    def calibrated_on(self) -> Fingerprint | None:
        """The machine the factors were fitted on (the calibration's stored fingerprint detail,
        whatever version wrote it), or None for datasheet figures."""
        detail = (self.calibration or {}).get("fingerprint_detail")
        return Fingerprint.from_dict(detail) if detail else None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "device_type": self.device_type,
            "peak_flops": {k: float(v) for k, v in self.peak_flops.items()},
            "mem_bandwidth": float(self.mem_bandwidth),
            "mem_bytes": int(self.mem_bytes),
            "l2_bytes": int(self.l2_bytes),
            "efficiency": {k: float(v) for k, v in self.efficiency.items()},
            "overhead_s": float(self.overhead_s),
            "attention_tile": int(self.attention_tile),
            "sources": dict(self.sources),
            "calibration": plain(self.calibration),
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "profile") -> "HardwareProfile":
        if not isinstance(data, dict):
            raise CostError(f"{where}: a profile must be a mapping, got {type(data).__name__}")
        required = ("name", "peak_flops", "mem_bandwidth", "efficiency")
        missing = [k for k in required if k not in data]
        if missing:
            raise CostError(f"{where}: missing field(s) {missing}; a profile needs {list(required)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CostError(f"{where}: unknown field(s) {unknown}; allowed are {sorted(known)}")

        def number(field_name, value, positive=True):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise CostError(f"{where}: {field_name}={value!r} is not a number") from None
            if not math.isfinite(value) or (positive and value <= 0) or value < 0:
                bound = "> 0" if positive else ">= 0"
                raise CostError(f"{where}: {field_name}={value!r} must be a finite number {bound}")
            return value

        peaks = data["peak_flops"]
        if not isinstance(peaks, dict) or set(peaks) != set(PEAK_KEYS):
            raise CostError(f"{where}: peak_flops must give exactly {list(PEAK_KEYS)}, got {peaks!r}")
        eff = data["efficiency"]
        if not isinstance(eff, dict) or set(eff) != set(EFFICIENCY_KEYS):
            raise CostError(f"{where}: efficiency must give exactly {list(EFFICIENCY_KEYS)}, got {eff!r}")
        device_type = data.get("device_type", "cuda")
        if device_type not in DEVICE_TYPES:
            raise CostError(f"{where}: device_type={device_type!r} is not allowed: choose one of {DEVICE_TYPES}")
        return cls(
            name=str(data["name"]),
            display_name=str(data.get("display_name", data["name"])),
            peak_flops={k: number(f"peak_flops.{k}", v) for k, v in peaks.items()},
            mem_bandwidth=number("mem_bandwidth", data["mem_bandwidth"]),
            mem_bytes=number("mem_bytes", data.get("mem_bytes", 0), positive=False),
            l2_bytes=number("l2_bytes", data.get("l2_bytes", 0), positive=False),
            efficiency={k: number(f"efficiency.{k}", v) for k, v in eff.items()},
            overhead_s=number("overhead_s", data.get("overhead_s", 0.0), positive=False),
            sources=dict(data.get("sources") or {}),
            calibration=data.get("calibration"),
            device_type=device_type,
            attention_tile=_tile(where, data.get("attention_tile", 128)),
        )


def plain(obj):
    """numpy scalars and tuples -> plain Python, so YAML stays readable."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def user_profile_dir() -> Path:
    """Where calibrated profiles live: ``$SQA_SEARCH_CACHE/profiles`` or ``~/.cache/sqa_search/profiles``."""
    return cache_dir("profiles")


def _normalise_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    return _ALIASES.get(key, key)


def _names_in(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob("*.yaml")}


def list_profiles() -> list[str]:
    """Names `load_profile` accepts: shipped profiles and calibrated ones in `user_profile_dir`."""
    return sorted(_names_in(_SHIPPED_DIR) | _names_in(user_profile_dir()))


def _read_profile(path: Path) -> HardwareProfile:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CostError(f"profile file {path} is not valid YAML: {exc}") from None
    return HardwareProfile.from_dict(data, where=str(path))


def load_profile(name_or_path, *, calibrated: bool = True) -> HardwareProfile:
    """A profile by name (e.g. "h100-sxm") or from a YAML path.

    Names look in the user calibration directory first (when `calibrated`), then in the
    shipped profiles; aliases like "h100", "a100", "4090", "cpu" resolve to shipped names.
    """
    if isinstance(name_or_path, HardwareProfile):
        return name_or_path
    text = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else str(name_or_path)
    looks_like_path = isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise CostError(f"profile={text!r}: no profile file there")
        return _read_profile(path)
    name = _normalise_name(text)
    if calibrated:
        user = user_profile_dir() / f"{name}.yaml"
        if user.is_file():
            return _read_profile(user)
    shipped = _SHIPPED_DIR / f"{name}.yaml"
    if shipped.is_file():
        return _read_profile(shipped)
    raise CostError(f"profile={text!r} is not known: choose one of {', '.join(list_profiles())} (or give a .yaml path)")


def save_profile(profile: HardwareProfile, path=None) -> Path:
    """Write `profile` as YAML; path None (or a directory) -> ``<dir>/<name>.yaml`` in
    `user_profile_dir` (or that directory), where `load_profile(name)` finds it first."""
    if path is None:
        path = user_profile_dir()
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix not in (".yaml", ".yml"):
        path = path / f"{profile.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# sqa-search hardware profile {profile.name}: {profile.calibration_label}\n"
    path.write_text(header + yaml.safe_dump(profile.to_dict(), sort_keys=False))
    return path


def _tile(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CostError(f"{where}: attention_tile={value!r} is not allowed: must be an integer >= 1")
    return int(value)
