"""Several ``distmerge run`` jobs in one torchrun launch, one after the other, in one process
group (as ``distmerge soup`` runs its merges: every job's ``dist.init`` reuses the group).
Starting torchrun and its workers (importing torch, meeting in a process group) costs far more
than merging the tiny test models, so tests/test_distributed.py launches K ranks once for all
its recipes instead of once per recipe:

    torchrun --standalone --nproc-per-node K tests/torchrun_jobs.py RECIPE OUT [ARGS...] -- RECIPE OUT [ARGS...]

Each job is ``distmerge run RECIPE OUT ARGS...`` through ``distmerge.cli.main``; the first job
that fails ends the launch with its exit code.
"""

import sys

from distmerge import dist
from distmerge.cli import main


def jobs(argv: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for a in argv:
        if a == "--":
            out.append([])
        else:
            out[-1].append(a)
    return [j for j in out if j]


if __name__ == "__main__":
    group = dist.init()  # the device the jobs pick by default too (their --device auto)
    try:
        for args in jobs(sys.argv[1:]):
            try:
                main(["run", *args])
            except SystemExit as e:
                if e.code:
                    raise
    finally:
        group.close()
