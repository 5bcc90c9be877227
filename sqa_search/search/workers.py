"""Several worker processes on one study, on one host (`sqa-search run --workers N`).

Each worker is a fresh (spawned) process that runs the study's trials until the study has its
target; the storage (a journal file by default) is what they share. A worker that dies costs no
configuration: the others, or the caller once they are done, re-run its trial first.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection

__all__ = ["run_processes"]

log = logging.getLogger(__name__)


def run_processes(target, args: tuple, workers: int, progress: bool) -> bool:
    """Run `target(*args)` in `workers` spawned processes until every one has ended.

    Returns True when all exited cleanly; otherwise says how many died (their trials are found
    interrupted and re-run by whoever runs the study next) and returns False.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for _ in range(workers)]
    for p in procs:
        p.start()
    running = list(procs)
    while running:  # reap each worker as it ends, so a dead one is not left a zombie that looks alive
        ended = multiprocessing.connection.wait([p.sentinel for p in running])
        for p in [p for p in running if p.sentinel in ended]:
            p.join()
            running.remove(p)
    died = [p.exitcode for p in procs if p.exitcode != 0]
    if not died:
        return True
    message = (f"{len(died)} of {workers} worker process(es) exited with codes {died}; their trials are "
               f"recorded as interrupted and run again")
    log.warning(message)
    if progress:
        print(message)
    return False
