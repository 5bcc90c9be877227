"""The machine a timing ran on: one `Fingerprint` type, read and written in one place.

A fingerprint holds what a timing depends on besides its shape (device, software, CPU, threads,
dtype) and no hostnames or serial numbers: two identical machines share one, which is the point
(timings transfer between them). Its `id` hashes the hardware and software fields only, so one id
groups every timing taken on one machine, whatever the thread count or dtype.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

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
