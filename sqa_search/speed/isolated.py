"""One timing in a fresh Python process, for long sweeps where compiled kernels would pile up
recompilations in one process (dynamo's recompile limit then silently falls back to eager).

`time_spec_subprocess` runs ``python -m sqa_search.speed.timing '<json>'`` (the request on argv,
one result line on stdout) and reads the record back; the harness itself is the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from . import timing_cache
from .record import TimingResult, new_record
from .workload import Workload

__all__ = ["time_spec_subprocess", "request_payload", "RESULT_MARKER"]

RESULT_MARKER = "SQA_TIMING_RESULT "
CHILD_MODULE = "sqa_search.speed.timing"


def request_payload(spec, workload: Workload, options: dict) -> str:
    """The request as the child reads it: spec, workload and the harness's options, as JSON."""
    options = dict(options)
    if options.get("cache_dir") is not None:
        options["cache_dir"] = str(options["cache_dir"])
    return json.dumps({"spec": spec.to_dict(), "workload": workload.to_dict(), "options": options})


def time_spec_subprocess(spec, workload: Workload, *, timeout_s: float | None = None, **options) -> TimingResult:
    """`time_spec` in a fresh process; same arguments (options are `time_spec`'s keywords), same record.

    A cached record is returned without starting a process. A process that dies (killed for
    memory, crashed in a kernel) or runs past `timeout_s` gives a record with status "oom"
    (killed by signal 9, the usual out-of-memory kill) or "error" and the end of its stderr.
    """
    # checks the arguments here, not in the child
    base, _, _ = new_record(spec, workload, backend=options.get("backend", "auto"),
                            speed_correction=options.get("speed_correction"), clock=options.get("clock", "wall"))
    if options.get("use_cache", True) and not options.get("force", False):
        hit = timing_cache.cached(base, options.get("cache_dir"))
        if hit is not None:
            return hit
    env = dict(os.environ)
    # the child must import this very package, wherever the caller imported it from
    pkg_root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", CHILD_MODULE, request_payload(base.spec, workload, options)],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        base.status, base.error = "error", f"fresh-process timing ran past timeout_s={timeout_s}"
        return base
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return TimingResult.from_dict(json.loads(line[len(RESULT_MARKER):]))
    tail = (proc.stderr or "").strip()[-1500:]
    base.status = "oom" if proc.returncode == -9 else "error"
    base.error = f"fresh-process timing exited with code {proc.returncode} and no result: {tail}"
    return base
