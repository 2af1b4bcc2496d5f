"""Worker processes for CPU-bound work (hashing) that never outlive the process using them.

A pool's workers wait on a pipe whose write end they hold themselves, so if their parent
is killed (SIGKILL, OOM) they would wait forever, keeping every file descriptor they
inherited: a repository lock among them, which would block gc for good.  Each worker
therefore asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG).  A
forkserver's workers are the server's children, and the server lives as long as they do
(each holds its liveness pipe), so those watch the process that made the pool instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
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


def _watch(creator: int) -> None:
    """A forkserver worker: exit once the process that made the pool has exited."""
    try:
        pidfd = os.pidfd_open(creator)
    except ProcessLookupError:
        os._exit(1)
    except OSError:
        return  # no pidfd (Linux < 5.3)

    def wait() -> None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll()  # readable once the creator has exited
        os._exit(1)

    threading.Thread(target=wait, daemon=True).start()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers die with the process that made it."""
    context = fork_context()
    if context.get_start_method() != "fork":  # forkserver: the server is their parent
        return ProcessPoolExecutor(
            workers, mp_context=context, initializer=_watch, initargs=(os.getpid(),)
        )
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_die_with, initargs=(os.getpid(),)
    )
