"""What a Ray study needs of the cluster: the resources of one trial, joining (or starting) Ray,
how many trials fit at once, and the list of Ray experiments under ``studies/<name>/ray/``."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray

from .ray_worker import is_number
from .space import SearchSpace
from .storage import StudyError

__all__ = ["TrialResources", "trial_resources", "connect", "check_address", "default_concurrency",
           "load_experiments", "save_experiments", "DEFAULT_MAX_CONCURRENT", "EXPERIMENTS_FILE"]

EXPERIMENTS_FILE = "experiments.json"
DEFAULT_MAX_CONCURRENT = 4


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds on the cluster: CPUs and GPUs (whole GPUs when it times on one)."""

    cpus: float = 1
    gpus: float = 0

    def as_ray(self) -> dict:
        return {"cpu": self.cpus, "gpu": self.gpus}


def trial_resources(space: SearchSpace, cpus_per_trial=1, gpus_per_trial=None, cluster_gpus: float = 0) -> TrialResources:
    """Validate (or choose, for gpus_per_trial=None) the resources of one trial.

    A trial times the spec and trains it. Timing on a GPU needs the whole device: fractional
    GPUs share a device with no isolation, so a neighbour's kernels would be timed too. Training
    alone (latency predicted by a cost-model profile, or timed on the CPU) may share a GPU.
    """
    t = space.target
    train_device = str(space.training.get("device", "cpu"))
    if not is_number(cpus_per_trial) or cpus_per_trial <= 0:
        raise StudyError(f"cpus_per_trial={cpus_per_trial!r} is not allowed: must be a number > 0")
    if t.measured and t.device.startswith("cuda"):
        gpu_timing = True
    elif t.measured and t.device == "auto":
        gpu_timing = None  # a GPU if the trial is given one
    else:
        gpu_timing = False
    if gpus_per_trial is None:
        wants_gpu = gpu_timing or train_device.startswith("cuda") or (gpu_timing is None and cluster_gpus > 0)
        gpus_per_trial = 1 if wants_gpu else 0
    if not is_number(gpus_per_trial) or gpus_per_trial < 0:
        raise StudyError(f"gpus_per_trial={gpus_per_trial!r} is not allowed: must be a number >= 0")
    times_on_gpu = gpu_timing or (gpu_timing is None and gpus_per_trial > 0)
    if times_on_gpu and gpus_per_trial != int(gpus_per_trial):
        raise StudyError(
            f"gpus_per_trial={gpus_per_trial!r} is not allowed with target.hardware=local, "
            f"target.device={t.device}: a timing trial needs whole GPUs (an integer >= 1), because "
            f"fractional GPUs share a device with no isolation and corrupt timings. Training-only trials "
            f"may share a GPU: predict latency with a cost-model profile (target.hardware) to use fractions")
    if gpu_timing and gpus_per_trial < 1:
        raise StudyError(f"gpus_per_trial={gpus_per_trial!r} is not allowed with target.device={t.device}: "
                         f"timing on a GPU needs gpus_per_trial >= 1")
    if train_device.startswith("cuda") and gpus_per_trial <= 0:
        raise StudyError(f"gpus_per_trial={gpus_per_trial!r} is not allowed with training.device={train_device}: "
                         f"training on a GPU needs gpus_per_trial > 0")
    for field_name, device in (("target.device", t.device), ("training.device", train_device)):
        if device.startswith("cuda:") and int(device.split(":", 1)[1]) >= max(1, math.ceil(gpus_per_trial)):
            raise StudyError(
                f"{field_name}={device} is not allowed with gpus_per_trial={gpus_per_trial!r}: Ray shows a trial "
                f"only its own GPUs, numbered from cuda:0; use cuda (or cuda:0)")
    gpus = int(gpus_per_trial) if gpus_per_trial == int(gpus_per_trial) else float(gpus_per_trial)
    cpus = int(cpus_per_trial) if cpus_per_trial == int(cpus_per_trial) else float(cpus_per_trial)
    return TrialResources(cpus=cpus, gpus=gpus)


def load_experiments(ray_dir: Path) -> list[dict]:
    path = ray_dir / EXPERIMENTS_FILE
    return json.loads(path.read_text())["experiments"] if path.is_file() else []


def save_experiments(ray_dir: Path, experiments: list[dict]) -> None:
    ray_dir.mkdir(parents=True, exist_ok=True)
    path = ray_dir / EXPERIMENTS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"experiments": experiments}, indent=2))
    os.replace(tmp, path)


def connect(address: str | None, num_cpus, num_gpus, progress: bool) -> bool:
    """Join a cluster or start a local instance; True when this call started Ray (and stops it)."""
    check_address(address)
    if ray.is_initialized():
        return False
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # e.g. inside `ray job submit`
    common = dict(logging_level=logging.WARNING, log_to_driver=progress)
    if address is None:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **common)
    else:
        if num_cpus is not None or num_gpus is not None:
            raise StudyError("num_cpus/num_gpus size a local Ray instance; a cluster's size is set by `ray start`")
        _check_reachable(address)
        try:
            ray.init(address=address, **common)
        except Exception as exc:  # noqa: BLE001 - Ray raises several kinds; say what to check
            raise StudyError(f"cannot join the Ray cluster at {address!r}: {type(exc).__name__}: {exc}. Check that "
                             f"`ray start --head` runs there, that this machine can reach it, and, with token "
                             f"authentication, that the cluster's token is here (~/.ray/auth_token or "
                             f"RAY_AUTH_TOKEN)") from exc
    return True


def check_address(address) -> None:
    if address is not None and (not isinstance(address, str) or address.startswith("ray://") or not address):
        raise StudyError(f"address={address!r} is not allowed: give the head node's HOST:PORT (or auto). Ray Client "
                         f"(ray://) runs the driver elsewhere, but the driver writes the results into studies/: run "
                         f"sqa-search on a node of the cluster instead")


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes: Ray retries an unreachable head for a long time."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray finds the address itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as exc:
        raise StudyError(f"cannot join the Ray cluster at {address!r}: nothing answers there ({exc}); start it "
                         f"with `ray start --head --port={port}` on the head node") from None


def default_concurrency(resources: TrialResources) -> int:
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 1) // resources.cpus) if resources.cpus else DEFAULT_MAX_CONCURRENT
    if resources.gpus:
        fits = min(fits, int(total.get("GPU", 0) // resources.gpus))
    return max(1, min(DEFAULT_MAX_CONCURRENT, fits))
