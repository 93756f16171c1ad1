"""A stage: a script that sweep.py or experiment.py runs as a child process.

A stage must not outlive the orchestrator that started it: an orphan would go on writing into a
folder that the next run of the same command also writes. On Linux each child asks the kernel for
SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), whatever killed the parent, -9 included; the
scripts save and exit on SIGTERM. Under torchrun the stage's parent is torchrun's agent, and each
worker (train.py) asks the same of the agent. Imports only the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent():
    """Ask the kernel to send this process SIGTERM when its parent exits (Linux; elsewhere nothing).
    Use as subprocess.Popen(..., preexec_fn=die_with_parent), or call at a worker's start."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect: the signal will never come
        os.kill(os.getpid(), signal.SIGTERM)
