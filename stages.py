"""A stage: a script that sweep.py or experiment.py runs as a child process.

A stage must not outlive the orchestrator that started it: an orphan would go on writing into a
folder that the next run of the same command also writes. On Linux each child asks the kernel for
SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), whatever killed the parent, -9 included; the
scripts save and exit on SIGTERM. Under torchrun the stage's parent is torchrun's agent, and each
worker (train.py) asks the same of the agent.

The sweep's stages also carry a stamp (STAMP_FILE in the stage's folder): the command and the identity
of each input checkpoint it ran with, and whether it finished. A rerun skips a finished stage with the
same stamp, resumes an unfinished one and wipes one made by another command or from other inputs
(decide). Imports only the standard library and files.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import files

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


# ----------------------------------------------------------------------------------------------
# Stages: commands, stamps, resume

REPO_DIR = Path(__file__).resolve().parent  # where every stage's command runs
STAMP_FILE = ".sweep_stage.json"
# Flags whose value does not change a stage's result beyond rounding (or at all): not part of its identity.
IDENTITY_FREE_FLAGS = ("--threads", "--device", "--log_every")


class SweepError(Exception):
    """A sweep that cannot go on as asked: the message names the stage or flag and what to do."""


@dataclass
class Stage:
    """One command of the sweep. Done when its stamp matches and `outputs` exist."""
    key: str  # unique, e.g. "post_LQK_2kv_128_SWA/s0/pretrain"
    command: list[str]
    out: Path
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)  # checkpoints whose identity the stamp records
    after: list[str] = field(default_factory=list)  # keys of stages to finish first
    run: str | None = None  # the run (architecture/seed) it belongs to
    kind: str = ""


def identity_command(command: list[str]) -> list[str]:
    """The command without flags that do not change results (threads, device, logging) and their values,
    and with the interpreter's path as "python", so that a sweep moved to another checkout or venv resumes."""
    kept, skip = [], False
    for index, part in enumerate(command):
        if index == 0 and part == sys.executable:
            part = "python"
        if skip:
            skip = False
            continue
        if part in IDENTITY_FREE_FLAGS:
            skip = True
            continue
        kept.append(part)
    return kept


def checkpoint_identity(path: Path) -> str:
    """sha256 over a checkpoint's config.json and weights: the stage reruns when its input changed."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        file = Path(path) / name
        if not file.is_file():
            raise SweepError(f"input checkpoint {path} has no {name}; its stage did not finish (rerun the sweep)")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stamp_of(stage: Stage) -> dict:
    return {"command": identity_command(stage.command),
            "inputs": {str(p): checkpoint_identity(p) for p in stage.inputs}}


def read_stamp(stage: Stage) -> dict | None:
    path = stage.out / STAMP_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None  # a stamp cut short: treat the stage as of unknown provenance


def write_stamp(stage: Stage, stamp: dict, status: str, seconds: float | None = None) -> None:
    stage.out.mkdir(parents=True, exist_ok=True)
    record = dict(stamp, status=status, full_command=stage.command, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if seconds is not None:
        record["seconds"] = seconds
    files.write_json_atomically(stage.out / STAMP_FILE, record)


def decide(stage: Stage) -> str:
    """'skip' (done, same command and inputs), 'resume' (interrupted, same), 'fresh' (nothing there),
    'invalidated' (a previous result from another command or input: wiped before running), or 'waiting'
    (an input checkpoint does not exist yet)."""
    if not all((Path(p) / "model.safetensors").is_file() for p in stage.inputs):
        return "waiting"  # (--plan) an input stage has not finished
    stamp = read_stamp(stage)
    if stamp is None:
        return "invalidated" if stage.out.exists() and any(stage.out.iterdir()) else "fresh"
    wanted = stamp_of(stage)
    if stamp.get("command") != wanted["command"] or stamp.get("inputs") != wanted["inputs"]:
        return "invalidated"
    if stamp.get("status") == "done" and all(p.exists() for p in stage.outputs):
        return "skip"
    return "resume"


def run_stage(stage: Stage, env: dict, log_dir: Path) -> dict:
    """Run one stage (or skip it); returns its index record. Raises SweepError when the command fails."""
    decision = decide(stage)
    stamp_path = stage.out / STAMP_FILE
    if decision == "skip":
        record = json.loads(stamp_path.read_text())
        return {"key": stage.key, "decision": "skip", "seconds": record.get("seconds"), "command": stage.command}
    if decision == "invalidated":
        shutil.rmtree(stage.out)  # --resume auto would otherwise continue the old run
    stamp = stamp_of(stage)
    write_stamp(stage, stamp, "running")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / (stage.key.replace("/", "__") + ".log")
    start = time.monotonic()
    with open(log, "a") as handle:
        handle.write(f"\n$ {shlex.join(stage.command)}\n")
        handle.flush()
        done = subprocess.run(stage.command, cwd=REPO_DIR, env=env, stdout=handle, stderr=subprocess.STDOUT,
                              preexec_fn=die_with_parent)  # no orphan writes on after the sweep
    seconds = time.monotonic() - start
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SweepError(f"{stage.key} failed (exit {done.returncode}): {shlex.join(stage.command)}\n  log {log}:\n"
                         + "\n".join(tail))
    missing = [str(p) for p in stage.outputs if not p.exists()]
    if missing:
        raise SweepError(f"{stage.key} finished but did not write {missing}; log {log}")
    write_stamp(stage, stamp, "done", seconds)
    return {"key": stage.key, "decision": decision, "seconds": seconds, "command": stage.command}
