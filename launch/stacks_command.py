"""``sagan stacks RUN`` and ``sagan status NAME --stacks``: every rank's stacks of a running job,
without stopping it (``trainer.runtime.watchdog.request_stacks``)."""

from __future__ import annotations

import argparse
import sys

from trainer.runtime.watchdog import REQUEST_POLL_SECONDS, request_stacks

SUMMARY = ("last completed step", "in collective:", "behind:")


class NoAnswer(ValueError):
    """No rank of a job answered a request for stacks (a wrong run folder, or no job running)."""


def print_stacks(run_dir: str, wait_seconds: float) -> int:
    folder, found, world_size = request_stacks(run_dir, wait_seconds)
    if not found:
        raise NoAnswer(
            f"no rank of a job writing to {run_dir} answered within {wait_seconds:.0f} s (rank 0 looks for "
            f"requests every {REQUEST_POLL_SECONDS:.0f} s): is a run with run.dir={run_dir} running?"
        )
    print(f"stacks of {len(found)} of {world_size} ranks in {folder}/")
    for rank, text in sorted(found.items()):
        lines = text.splitlines()
        print(f"rank {rank}: {folder}/rank_{rank}.txt")
        for line in lines[1:8]:
            if line.startswith(SUMMARY):
                print(f"  {line}")
    missing = sorted(set(range(world_size)) - set(found))
    if missing:
        print(
            f"sagan stacks: error: ranks {', '.join(map(str, missing))} did not answer within "
            f"{wait_seconds:.0f} s: the dumps of the others name what they wait for",
            file=sys.stderr,
        )
        return 1
    return 0


def stacks(args: argparse.Namespace) -> int:
    return print_stacks(args.run_url, args.wait)
