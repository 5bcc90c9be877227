"""Suite-wide: the tests' caches (timings, the machine-speed reference, tokens, calibrated
profiles) live in one temporary directory, never in the user's ~/.cache; `postgres_url` is a
real PostgreSQL server for the tests that need one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_root(tmp_path_factory):
    old = os.environ.get("SQA_SEARCH_CACHE")
    os.environ["SQA_SEARCH_CACHE"] = str(tmp_path_factory.mktemp("sqa_search_cache"))
    yield
    if old is None:
        os.environ.pop("SQA_SEARCH_CACHE", None)
    else:
        os.environ["SQA_SEARCH_CACHE"] = old


# CI sets this: a skip there means a component was not installed, so the test never ran. Only
# tests that need a CUDA device may skip (the machine has none); any other skip fails the run.
ONLY_CUDA_SKIPS = "SQA_SEARCH_ONLY_CUDA_SKIPS"
_session = {}


def pytest_sessionstart(session):
    _session["it"] = session


def _skip_reason(report) -> str:
    return str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not os.environ.get(ONLY_CUDA_SKIPS):
        return
    bad = [f"{r.nodeid}: {_skip_reason(r)}" for r in terminalreporter.stats.get("skipped", [])
           if "cuda" not in _skip_reason(r).lower()]
    if bad:
        terminalreporter.write_line(f"{ONLY_CUDA_SKIPS} is set and {len(bad)} test(s) skipped for a reason "
                                    "other than CUDA:", red=True)
        for line in bad:
            terminalreporter.write_line("  " + line, red=True)
        # terminal_summary runs inside sessionfinish, before pytest reads the exit status
        _session["it"].exitstatus = pytest.ExitCode.TESTS_FAILED


# ----- a real PostgreSQL server for the study tests (tests/test_postgres.py) ----------------------
def _postgres_bindir():
    """The folder with initdb and pg_ctl: pg_config's, then Debian's /usr/lib/postgresql/*/bin."""
    import glob
    import shutil
    import subprocess

    candidates = []
    if shutil.which("pg_config"):  # libpq-dev's pg_config may name a folder without the server
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                         if Path(d).parent.name.isdigit() else 0, reverse=True)
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("pg_ctl")).parent))
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of its own (temp data folder, a free port on 127.0.0.1, trust auth),
    stopped and deleted at the end; its URL. PostgreSQL refuses to run as root, so as root the
    server runs as the `postgres` system user (Debian's postgresql package makes it)."""
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is missing: pip install -e '.[test]'")
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="sqa-search-pg-"))  # under /tmp: the postgres user can reach it
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, log = folder / "data", folder / "server.log"

    def pg(*args):
        subprocess.run(as_user + [str(bindir / args[0]), *args[1:]], check=True, capture_output=True, text=True)

    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
           "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=100")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL from {bindir} did not start: {exc.stderr}") from None
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
