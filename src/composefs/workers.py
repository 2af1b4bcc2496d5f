"""Worker processes for CPU-bound work (hashing) that never outlive the process using them.

A pool's workers wait on a pipe whose write end they hold themselves, so if their parent
is killed (SIGKILL, OOM) they would wait forever, keeping every file descriptor they
inherited: a repository lock among them, which would block gc for good.  Each worker
therefore asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import multiprocessing.context

_PR_SET_PDEATHSIG = 1


def fork_context() -> multiprocessing.context.BaseContext:
    import multiprocessing

    # fork is cheapest, but forking a process that runs other threads is unsafe.
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver")


def _die_with(parent: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers die with the process that made it."""
    context = fork_context()
    parent = os.getpid() if context.get_start_method() == "fork" else None
    if parent is None:  # forkserver: the workers' parent is the server, which exits with us
        return ProcessPoolExecutor(workers, mp_context=context)
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_die_with, initargs=(parent,)
    )
