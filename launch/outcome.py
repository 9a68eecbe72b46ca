"""How a command ends, on one process or on every rank of a job: one-line errors, exit codes, shutdown.

Bad input from the user (config, data, URL, checkpoint, credentials) is one line on stderr and exit
status 2; anything else is logged with its traceback and exit status 1. On a distributed job a failing
rank tells every other rank through the job's store (``trainer.runtime.coordination.FailureNotice``), so the
whole job ends at once, each rank reporting the job's first failure rather than the broken connection
it saw as a consequence; the message also goes to torchrun's error file. A pre-emption (every rank
stopped at one step, its checkpoint committed) leaves together with status 128 + the signal. The
command says all this *before* ``trainer.runtime.distributed.shutdown``, which does not return on a failed rank.
Messages never carry credentials (``data_pipeline.storage.scrub_credentials``).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable

from data_pipeline.errors import DataError, first_line
from data_pipeline.storage import scrub_credentials
from trainer.checkpoint.format import CheckpointError
from trainer.config import ConfigError
from trainer.runtime.coordination import FailureNotice, record_for_launcher
from trainer.runtime.distributed import Runtime, shutdown
from trainer.runtime.nonfinite import Diverged
from trainer.runtime.preemption import Preempted
from trainer.runtime.watchdog import OutOfMemory

log = logging.getLogger("sagan")

USER_ERRORS = (ConfigError, DataError, CheckpointError, OutOfMemory, ValueError, OSError)
USER_ERROR_STATUS = 2


def one_line(err: BaseException) -> str:
    """The first line of an error, without the ``[file.cc:123] `` prefix of torch's C++ errors, and
    without credentials."""
    return scrub_credentials(re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", first_line(err)))


def report(command: str, err: BaseException) -> int:
    """Say what was wrong in one line; the exit status for bad input."""
    print(f"sagan {command}: error: {one_line(err)}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def run_on_ranks(command: str, runtime: Runtime, work: Callable[[], None]) -> int:
    """Run ``work`` on this rank, then leave the job the way its outcome asks (see the module doc)."""
    exit_code, together = 1, False
    notice = FailureNotice(runtime, command)  # another rank's failure ends this one at once, with its message
    try:
        work()
        exit_code = 0
    except Preempted as stop:
        if runtime.is_main:
            print(f"sagan {command}: {stop}", file=sys.stderr, flush=True)
        exit_code, together = stop.exit_code, True
    except BaseException as err:
        user_error = isinstance(err, USER_ERRORS)
        if not (user_error or isinstance(err, Diverged)):
            log.exception("rank %d failed", runtime.rank)  # the traceback, for what no one foresaw
        message, exit_code = notice.publish(one_line(err), USER_ERROR_STATUS if user_error else 1)
        print(f"sagan {command}: error: {message}", file=sys.stderr, flush=True)
        record_for_launcher(message)
    finally:
        notice.stop()
        shutdown(runtime, exit_code, together=together or exit_code == 0)
    return exit_code
