"""How a command ends, on one process or on every rank of a job: one-line errors, exit codes, shutdown.

Bad input from the user (config, data, URL, checkpoint, credentials) is one line on stderr and exit
status 2; anything else is logged with its traceback and exit status 1. A distributed command says so
*before* ``trainer.distributed.shutdown``, which does not return on a failed rank (it ends the process
so its peers' next collective fails instead of hanging).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from data_pipeline.errors import DataError, first_line
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.distributed import Runtime, shutdown
from trainer.termination import EXIT_STATUS, Terminated

log = logging.getLogger("sagan")

USER_ERRORS = (ConfigError, DataError, CheckpointError, ValueError, OSError)
USER_ERROR_STATUS = 2


def report(command: str, err: BaseException) -> int:
    """Say what was wrong in one line; the exit status for bad input."""
    print(f"sagan {command}: error: {first_line(err)}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def run_on_ranks(command: str, runtime: Runtime, work: Callable[[], None]) -> int:
    """Run ``work`` on this rank, then leave the job the way its outcome asks (see the module doc)."""
    exit_code = 1
    try:
        work()
        exit_code = 0
    except Terminated as stopped:
        log.warning("rank %d %s", runtime.rank, stopped)
        exit_code = EXIT_STATUS
    except USER_ERRORS as err:
        exit_code = report(command, err)
    except BaseException:
        log.exception("rank %d failed", runtime.rank)
    finally:
        shutdown(runtime, exit_code)
    return exit_code
