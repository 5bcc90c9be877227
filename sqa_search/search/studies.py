"""A study to run or read: its folder, storage, sampler and search space, as a `StudyHandle`.

`open_study` opens an existing folder read-only (show, recommend, export); `prepare_study`
creates one or resumes it after checking that nothing in it is damaged, before the first write.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from .recovery import RetryFirstStudy, retry_stale_trial
from .samplers import make_pruner, make_sampler
from .space import SearchSpace
from .storage import (
    META_FILE,
    SPACE_FILE,
    StudyError,
    check_storage_url,
    existing_meta,
    load_existing_study,
    open_storage,
    read_meta,
    safe_url,
    stored_space,
)

__all__ = ["StudyHandle", "DEFAULT_STUDIES_DIR", "study_dir_for", "open_study", "open_study_storage",
           "prepare_study", "running_study", "store_study_settings"]

DEFAULT_STUDIES_DIR = Path("studies")


@dataclass
class StudyHandle:
    study: optuna.Study
    space: SearchSpace
    directory: Path
    storage_url: str


def study_dir_for(name: str, studies_dir: str | Path = DEFAULT_STUDIES_DIR) -> Path:
    return Path(studies_dir) / name


def _default_storage(study_dir: Path, workers: int) -> str:
    if workers > 1:  # several processes on one host: a journal file, no database locking
        return f"journal:{(study_dir / 'journal.log').resolve()}"
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def open_study_storage(url: str, heartbeat: bool = True, *, existing: bool = False):
    """A study's storage for running trials (heartbeats re-run a stale trial); heartbeat=False:
    read-only use (show, recommend, export), nothing is written."""
    return open_storage(url, read_only=not heartbeat, existing=existing, retry_stale=retry_stale_trial)


def running_study(space: SearchSpace, storage) -> RetryFirstStudy:
    """The study as a worker runs it: the space's sampler and pruner, re-runs first."""
    return RetryFirstStudy(study_name=space.name, storage=storage, sampler=make_sampler(space), pruner=make_pruner())


def open_study(study_dir: str | Path) -> StudyHandle:
    """An existing study folder -> its Optuna study and search space, read-only: nothing in the
    folder or the storage is written, and a damaged folder is a StudyError saying what is wrong."""
    study_dir = Path(study_dir)
    meta = read_meta(study_dir)
    space = stored_space(study_dir, meta)
    storage = open_storage(meta["storage"], read_only=True, where="the study's storage")
    study = load_existing_study(storage, meta["name"], meta["storage"])
    return StudyHandle(study, space, study_dir, meta["storage"])


def _check_existing(space: SearchSpace, study_dir: Path, meta: dict, storage: str | None) -> None:
    """An existing study folder `run` may resume; refuses (writing nothing) otherwise."""
    if meta["name"] != space.name:
        raise StudyError(f"{str(study_dir / META_FILE)!r} is damaged or moved: it names study {meta['name']!r}, "
                         f"but the folder is the study {space.name!r}'s")
    if meta["space_fingerprint"] != space.fingerprint():
        raise StudyError(
            f"study {space.name!r} in {study_dir} was made from a different search space "
            f"(model, target, search, constraints, objectives or training changed): resuming would mix "
            f"incomparable trials. Use another --name, or delete {study_dir} to start over."
        )
    if storage and storage != meta["storage"]:
        raise StudyError(f"study {space.name!r} lives in {safe_url(meta['storage'])}; --storage "
                         f"{safe_url(storage)} differs")
    stored_space(study_dir, meta)  # show and report read it: it must be whole before more trials go in


def _directions_of(study: optuna.Study) -> list[str]:
    return [d.name.lower() for d in study.directions]


def prepare_study(space: SearchSpace, space_path: Path | None, studies_dir, storage, workers) -> StudyHandle:
    """The study to run: created, or resumed after checking that nothing in its folder is damaged.

    Everything is checked before the first write, so a refused run leaves every file as it was.
    """
    if storage is not None:
        check_storage_url(storage)
    study_dir = study_dir_for(space.name, studies_dir)
    meta = existing_meta(study_dir)
    directions = [o.direction for o in space.objectives_in_use()]
    if meta is not None:
        _check_existing(space, study_dir, meta, storage)
        storage_url = meta["storage"]
        opened = open_study_storage(storage_url, existing=True)
        study = load_existing_study(opened, space.name, storage_url, sampler=make_sampler(space),
                                    pruner=make_pruner(), study_class=RetryFirstStudy)
        if _directions_of(study) != directions:
            raise StudyError(
                f"study {space.name!r} optimises {_directions_of(study)}, but the search "
                f"space now asks for {directions} (study.mode or objectives changed): use another --name"
            )
        return StudyHandle(study, space, study_dir, storage_url)
    storage_url = storage or _default_storage(study_dir, workers)
    if not storage:  # the default storage lives in the folder; a given one is opened (or refused) first
        study_dir.mkdir(parents=True, exist_ok=True)
    opened = open_study_storage(storage_url)
    try:  # a shared server may hold it already (another host made it): join it
        existing = optuna.load_study(study_name=space.name, storage=opened)
    except KeyError:
        existing = None
    fingerprint = space.fingerprint()
    if existing is not None and existing.user_attrs.get("space_fingerprint", fingerprint) != fingerprint:
        raise StudyError(f"the storage {safe_url(storage_url)} holds a study {space.name!r} made from a different "
                         f"search space (on another host?): resuming would mix incomparable trials; use another --name")
    if existing is not None and _directions_of(existing) != directions:
        raise StudyError(f"the storage {safe_url(storage_url)} holds a study {space.name!r} that optimises "
                         f"{_directions_of(existing)}, not {directions}: use another --name")
    study_dir.mkdir(parents=True, exist_ok=True)
    _write_folder(space, space_path, study_dir, storage_url)
    created = optuna.create_study(study_name=space.name, storage=opened, directions=directions, load_if_exists=True)
    if existing is None:  # what a host joining the study later checks its own space against
        created.set_user_attr("space_fingerprint", fingerprint)
    return StudyHandle(running_study(space, opened), space, study_dir, storage_url)


def store_study_settings(handle: StudyHandle) -> None:
    """A resumed study's space.yaml takes this run's study section (trials, sampler, halving; not
    part of the fingerprint), so show and the report read the settings the study last ran with."""
    _write_space(handle.space, handle.directory)


def _write_space(space: SearchSpace, study_dir: Path) -> None:
    """space.yaml, whole or not at all; left untouched when it already says the same."""
    path = study_dir / SPACE_FILE
    text = yaml.safe_dump(space.to_dict(), sort_keys=False)
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_folder(space: SearchSpace, space_path: Path | None, study_dir: Path, storage_url: str) -> None:
    _write_space(space, study_dir)
    meta = {"name": space.name, "storage": storage_url, "space_fingerprint": space.fingerprint(),
            "source": str(space_path) if space_path else None, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    meta_path = study_dir / META_FILE
    tmp = meta_path.with_suffix(".tmp")  # study.json appears whole or not at all
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
