"""A study's folder and storage, checked before any work and opened without writing when only read.

`engine` runs studies; this module answers "is this a study I can open, and where are its
trials?" with a `StudyError` that names the file or flag, the value and what is allowed, raised
before anything is written: a storage URL with an unknown scheme, a missing driver or an
unreachable server; a study folder that is missing, empty, or whose ``study.json``,
``space.yaml`` or ``study.db`` is missing or damaged; a storage that does not hold the study.

Reading a study's trials (`show`, `recommend`, `export`) never writes into its storage: an
SQLite storage is opened read-only (``mode=ro``), and Optuna is told not to create tables in any
storage. (`show` then writes its report files, results.csv, plots and report.md, into the
folder, or into ``--out``; on a damaged study it refuses before writing anything.)
"""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path
from urllib.parse import quote

import optuna

from ..errors import UserError
from .space import SearchSpace, SpaceError, load_space

__all__ = ["StudyError", "check_storage_url", "open_storage", "read_meta", "existing_meta", "stored_space",
           "load_existing_study", "safe_url", "META_FILE", "SPACE_FILE", "META_KEYS"]

META_FILE = "study.json"
SPACE_FILE = "space.yaml"
META_KEYS = ("name", "storage", "space_fingerprint")  # what every study.json must hold, as strings
STORAGE_FORMS = ("sqlite:///PATH, postgresql://USER:PASSWORD@HOST:PORT/DATABASE, "
                 "mysql://USER:PASSWORD@HOST:PORT/DATABASE or journal:PATH")
RDB_BACKENDS = ("sqlite", "postgresql", "mysql")
# the pip package of each Python driver module SQLAlchemy may ask for (postgresql:// means psycopg
# from SQLAlchemy 2.1 on, psycopg2 before)
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "pymysql": "PyMySQL",
                   "MySQLdb": "mysqlclient", "asyncpg": "asyncpg", "pg8000": "pg8000"}
SQLITE_HEADER = b"SQLite format 3\x00"
OPTUNA_TABLES = ("studies", "trials", "version_info")
# heartbeats let a worker on any host fail (and re-queue) the trial of a worker that died elsewhere
HEARTBEAT_INTERVAL_S = 60
HEARTBEAT_GRACE_S = 180
CONNECT_TIMEOUT_S = 10


class StudyError(UserError):
    """A study that cannot be run or opened as asked; the message says why and what to do."""


# ----- storage URLs -------------------------------------------------------------------------------
def safe_url(url: str) -> str:
    """The URL with its password masked, for messages."""
    if url.startswith("journal:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: show it as given
        return url


def check_storage_url(url, field: str = "--storage") -> None:
    """Scheme, form and Python driver of a storage URL, checked before any work (no connection)."""
    if not isinstance(url, str) or not url.strip():
        raise StudyError(f"{field}={url!r} is not allowed: give {STORAGE_FORMS}")
    if url.startswith("journal:"):
        if not url[len("journal:"):].strip():
            raise StudyError(f"{field}={url!r} names no file: give journal:PATH")
        return
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StudyError(f"{field}={url!r} is not a storage URL: give {STORAGE_FORMS}") from None
    backend = parsed.get_backend_name()
    if backend not in RDB_BACKENDS:
        raise StudyError(f"{field}={safe_url(url)!r}: scheme {parsed.drivername!r} is not allowed: "
                         f"give {STORAGE_FORMS}")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StudyError(f"{field}={url!r} names no database file (an in-memory study would be lost): "
                         f"give sqlite:///PATH")
    try:
        parsed.get_dialect().import_dbapi()
    except sqlalchemy.exc.NoSuchModuleError:
        raise StudyError(f"{field}={safe_url(url)!r}: driver {parsed.drivername!r} is unknown to SQLAlchemy: "
                         f"give {STORAGE_FORMS}") from None
    except ImportError as exc:
        package = DRIVER_PACKAGES.get(exc.name or "", exc.name)
        raise StudyError(f"{field}={safe_url(url)!r} needs the Python driver {exc.name!r}, which is not "
                         f"installed: pip install {package}") from None


# ----- opening storages ---------------------------------------------------------------------------
def open_storage(url: str, *, read_only: bool = False, existing: bool = False, retry_stale=None,
                 where: str = "the storage"):
    """An Optuna storage for `url`, checked and connected; `where` names it in messages.

    existing: the study is known to live there, so a missing file is an error, not a new study.
    read_only: nothing is written (SQLite opened with mode=ro, no table creation), for `show`,
    `recommend` and `export`. Otherwise RDB storages beat a heartbeat, and `retry_stale(study,
    trial)` is called for each trial whose worker stopped beating (on any host).
    """
    check_storage_url(url, field=where)
    if url.startswith("journal:"):
        return _open_journal(Path(url[len("journal:"):]), read_only or existing, where)
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database)
        if read_only or existing or path.exists():
            check_sqlite_file(path, where)
        if read_only:  # mode=ro: SQLite itself refuses any write, journals included
            url = f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true"
    elif parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
        # an unroutable host fails in seconds, not minutes (libpq's option; other drivers differ)
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    if read_only:
        kwargs["skip_table_creation"] = True
    else:
        kwargs.update(heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=HEARTBEAT_GRACE_S,
                      heartbeat_stale_trial_callback=retry_stale)
    return _connect(url, where, **kwargs)


def _connect(url: str, where: str, **kwargs):
    import sqlalchemy

    try:
        with warnings.catch_warnings():  # "heartbeat is experimental" says nothing to the user
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **kwargs)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StudyError(f"cannot open {where} {safe_url(url)!r}: {reason} (is the server running and the "
                         f"URL right? an Optuna storage is {STORAGE_FORMS})") from None
    except RuntimeError as exc:  # a schema written by another Optuna version
        raise StudyError(f"cannot open {where} {safe_url(url)!r}: {exc}") from None


def check_sqlite_file(path: Path, where: str = "the storage") -> None:
    """An existing SQLite file that holds Optuna's tables, checked read-only with the stdlib."""
    advice = "restore it from a backup, or move the study folder away to start over"
    if not path.is_file():
        raise StudyError(f"{where} {str(path)!r} is missing: the study's trials were stored there; {advice}")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head != SQLITE_HEADER:
        raise StudyError(f"{where} {str(path)!r} is not an SQLite database (it starts with {head!r}, not "
                         f"{SQLITE_HEADER!r}); {advice}")
    try:
        con = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        try:
            problems = [row[0] for row in con.execute("PRAGMA quick_check")]
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise StudyError(f"{where} {str(path)!r} is damaged ({exc}); {advice}") from None
    if problems != ["ok"]:
        raise StudyError(f"{where} {str(path)!r} is damaged (SQLite integrity check: {problems[0]}); {advice}")
    missing = [t for t in OPTUNA_TABLES if t not in tables]
    if missing:
        raise StudyError(f"{where} {str(path)!r} is an SQLite database without Optuna's tables "
                         f"({', '.join(missing)} missing): not a study's storage; {advice}")


def _open_journal(path: Path, must_exist: bool, where: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if must_exist and not path.is_file():  # Optuna would create an empty one
        raise StudyError(f"{where} {str(path)!r} is missing: the study's trials were stored there")
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise StudyError(f"{where} {str(path)!r} is damaged ({type(exc).__name__}: {exc}); restore it "
                         f"from a backup") from None


def load_existing_study(storage, name: str, url: str, sampler=None, pruner=None, study_class=optuna.Study):
    """The study `name` in an opened storage, or a StudyError listing the studies it does hold."""
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        held = sorted(s.study_name for s in storage.get_all_studies())
        raise StudyError(f"the storage {safe_url(url)!r} holds no study named {name!r} "
                         f"(it holds {held or 'none'})") from None
    return study_class(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


# ----- the study folder ---------------------------------------------------------------------------
def read_meta(study_dir: Path) -> dict:
    """study.json of an existing study folder, checked; a missing or empty folder is an error."""
    if not study_dir.exists():
        raise StudyError(f"no study at {str(study_dir)!r}: the folder does not exist "
                         f"(`sqa-search run SPACE.yaml` makes one under studies/)")
    if not study_dir.is_dir():
        raise StudyError(f"no study at {str(study_dir)!r}: it is a file, not a study folder")
    meta_path = study_dir / META_FILE
    if not meta_path.is_file():
        held = sorted(p.name for p in study_dir.iterdir())
        what = "the folder is empty" if not held else f"the folder holds {held}"
        raise StudyError(f"no study at {str(study_dir)!r}: {META_FILE} is missing ({what}; "
                         f"`sqa-search run SPACE.yaml` makes a study)")
    return _parse_meta(meta_path)


def existing_meta(study_dir: Path) -> dict | None:
    """study.json for `run`: None for a new study (no folder, or an empty one); damage is an error."""
    if not study_dir.exists() or (study_dir.is_dir() and not any(study_dir.iterdir())):
        return None
    if study_dir.is_dir() and not (study_dir / META_FILE).exists():
        held = sorted(p.name for p in study_dir.iterdir())
        if _unused_storage_only(study_dir, held):
            return None
        raise StudyError(f"{str(study_dir)!r} holds {held} but no {META_FILE}: a damaged study or another "
                         f"program's folder, left as it is; use another --name or --studies-dir, or move it away")
    return read_meta(study_dir)


def _unused_storage_only(study_dir: Path, held: list[str]) -> bool:
    """A folder with nothing but an empty default storage: a run stopped while it made the study, or
    a dashboard opened on the path too early. Nothing is lost by making the study there."""
    if held == ["study.db"]:
        try:
            check_sqlite_file(study_dir / "study.db")
            con = sqlite3.connect(f"file:{quote(str((study_dir / 'study.db').resolve()))}?mode=ro", uri=True)
            try:
                return con.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 0
            finally:
                con.close()
        except (StudyError, sqlite3.DatabaseError):
            return False
    return held == ["journal.log"] and (study_dir / "journal.log").stat().st_size == 0


def _parse_meta(meta_path: Path) -> dict:
    damaged = f"{str(meta_path)!r} is damaged"
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StudyError(f"{damaged}: not JSON ({exc}); it should be an object with the strings "
                         f"{', '.join(META_KEYS)}. Restore it from a backup") from None
    if not isinstance(meta, dict):
        raise StudyError(f"{damaged}: it holds a {type(meta).__name__}, not an object with the strings "
                         f"{', '.join(META_KEYS)}")
    for key in META_KEYS:
        value = meta.get(key)
        if not isinstance(value, str) or not value:
            raise StudyError(f"{damaged}: {key}={value!r} is not allowed: a non-empty string is required")
    check_storage_url(meta["storage"], field=f"{meta_path}: storage")
    meta["storage"] = _follow_moved_folder(meta["storage"], meta_path.parent)
    return meta


def _follow_moved_folder(url: str, study_dir: Path) -> str:
    """study.json records the storage's absolute path; a study folder that was moved or copied keeps
    its own study.db (or journal.log), and that file is the one meant."""
    for prefix, local in (("sqlite:///", "study.db"), ("journal:", "journal.log")):
        if url.startswith(prefix):
            recorded = Path(url[len(prefix):])
            if not recorded.exists() and recorded.name == local and (study_dir / local).is_file():
                return prefix + str((study_dir / local).resolve())
    return url


def stored_space(study_dir: Path, meta: dict) -> SearchSpace:
    """The search space the study was made from (its copy in the folder), or why it cannot be read."""
    try:
        return load_space(study_dir / SPACE_FILE, name=meta["name"])
    except SpaceError as exc:  # on one line: a YAML parser's message spans several
        raise StudyError(f"the study in {str(study_dir)!r} has a missing or damaged {SPACE_FILE}: "
                         f"{' '.join(str(exc).split())}") from None
