"""A stage: a script that sweep.py or experiment.py runs as a child process.

A stage must not outlive the orchestrator that started it: an orphan would go on writing into a
folder that the next run of the same command also writes. On Linux each child asks the kernel for
SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), whatever killed the parent, -9 included; the
scripts save and exit on SIGTERM. Under torchrun the stage's parent is torchrun's agent, and each
worker (train.py) asks the same of the agent. Imports only the standard library.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# libc loaded once, here: a preexec_fn runs between fork and exec, where a thread-spawning or
# subprocess-running call (ctypes.util.find_library runs ldconfig) is not safe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent():
    """Ask the kernel to send this process SIGTERM when its parent exits (Linux; elsewhere nothing).
    Use as subprocess.Popen(..., preexec_fn=die_with_parent), or call at a worker's start."""
    if _LIBC is None:
        return
    parent = os.getppid()
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect: the signal will never come
        os.kill(os.getpid(), signal.SIGTERM)
