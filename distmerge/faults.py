"""Fault injection for the tests: ``DISTMERGE_FAULT`` makes one rank fail at a chosen step.

Unset in normal use, when ``fault_point`` returns at once. The tests kill runs with it at
every step of setting up the output directory, after N tensors, while files are published,
before the index and before the manifest, and check that a rerun resumes.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "DISTMERGE_FAULT"


def fault_point(rank: int, where: int | str) -> None:
    """Test hook: DISTMERGE_FAULT="RANK:WHERE:ACTION" makes rank RANK, at WHERE (after
    writing that many tensors, or at a named step: "setup-mkdir" ... "setup-done" in
    output.prepare, "prepared" once every rank has it, "journaled" each time its journal lines
    reach the disk (on the sync thread: a kill that surely leaves something to resume),
    "publish", "index", "manifest"),
    "raise" an error, "kill" itself with SIGKILL, or "sleep:S" (after every tensor from then
    on, to give a test time to kill the job; once at a named step, to let the other ranks
    run ahead). Unset in normal use."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    who, at, action = spec.split(":", 2)
    if int(who) != rank:
        return
    if action.startswith("sleep:"):
        if (isinstance(where, int) and at.isdigit() and where >= int(at)) or str(where) == at:
            time.sleep(float(action.split(":")[1]))
        return
    if str(where) == at:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at {where}")
