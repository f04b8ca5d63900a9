"""One trainer per workdir: `<workdir>/train.lock`, taken at start and released on exit.

The lock file records who holds it (host, PID, the process's start time, the start time as a
date, the SLURM job ID). It is created with an atomic link(2) of a finished file, so a reader
never sees half of it. A second trainer is refused with one sentence naming the holder. A lock
is stale, and taken over with a log line, when its holder is provably gone: on this host, no
live process has its PID and start time; or it belongs to this very SLURM job (a requeue, whose
earlier copy SLURM has ended). A holder on another host that is still listed cannot be checked
from here, so that lock is left alone. The holder re-reads the file before every save
(`still_ours`), so a trainer whose lock was taken over stops instead of writing beside the new
one. Readers (sampling, evaluation, analysis) take no lock.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time

from switch_dit_jax.errors import UserError

log = logging.getLogger("switch_dit_jax")

LOCK_NAME = "train.lock"


class WorkdirLockedError(UserError):
    """Another trainer holds the workdir (or took the lock over from this one)."""


def _process_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (Linux), which tells a live process
    from a later one that reuses its PID; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return stat[stat.rfind(")") + 2:].split()[0]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except OSError:
        return False
    if _process_state(pid) == "Z":  # exited, not yet reaped by its parent
        return False
    now = _process_start_ticks(pid)
    return start_ticks is None or now is None or now == start_ticks


def holder_info() -> dict:
    """What this process writes into the lock file."""
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_start_ticks": _process_start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None}
    return info


def describe(holder: dict) -> str:
    parts = [f"host {holder.get('host', '?')}", f"PID {holder.get('pid', '?')}"]
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    if holder.get("slurm_job_id"):
        parts.append(f"SLURM job {holder['slurm_job_id']}")
    return ", ".join(parts)


def stale_reason(holder: dict, me: dict) -> str | None:
    """Why a lock `holder` can be taken over by `me`, or None when it may still be live."""
    job = holder.get("slurm_job_id")
    if job and job == me.get("slurm_job_id"):
        return f"it belongs to this SLURM job ({job}), i.e. this run is its requeue"
    if holder.get("host") != me.get("host"):
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return None
    if pid == me.get("pid"):  # our PID, but we have not taken it: a previous life (container)
        return f"its PID {pid} is this process's, so its holder is gone"
    if not _pid_alive(pid, holder.get("pid_start_ticks")):
        return f"no process {pid} is running on {holder.get('host')}"
    return None


class WorkdirLock:
    """Context manager holding `<workdir>/train.lock`; raises WorkdirLockedError on entry when
    another live trainer holds it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.info = holder_info()
        self.held = False

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as held by someone unknown

    def _create(self) -> bool:
        """Atomically creates the lock file with our info; False when it exists."""
        tmp = f"{self.path}.{self.info['host']}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.info, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):  # a racing release or takeover may change the file between calls
            if self._create():
                self.held = True
                return
            holder = self._read()
            if holder is None:
                continue
            reason = stale_reason(holder, self.info) if holder else None
            if reason is None:
                who = describe(holder) if holder else "an unreadable lock file"
                raise WorkdirLockedError(
                    f"the workdir {os.path.dirname(self.path)} is in use by another trainer "
                    f"({who}; lock file {self.path}); stop that trainer or use another --workdir "
                    "(delete the lock file only if that trainer is gone).")
            if self._read() != holder:  # someone else took it over meanwhile: look again
                continue
            log.warning("taking over the stale lock %s of %s: %s.", self.path, describe(holder),
                        reason)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        raise WorkdirLockedError(f"could not take the lock {self.path}: other trainers keep "
                                 "taking it; start one trainer per --workdir.")

    def still_ours(self) -> bool:
        """Whether the lock file still names this process (it is re-read, not cached)."""
        holder = self._read()
        return bool(holder) and all(holder.get(k) == self.info[k] for k in ("host", "pid"))

    def holder(self) -> str:
        holder = self._read()
        return describe(holder) if holder else "nobody"

    def release(self) -> None:
        if self.held and self.still_ours():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _from_process_0(flag: bool) -> bool:
    import jax
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32))))


@contextlib.contextmanager
def hold(workdir: str):
    """The lock of a (multi-process) training run: process 0 takes it and every process learns
    the outcome, so that the others stop too instead of waiting for process 0. Yields the
    WorkdirLock on process 0 and None elsewhere."""
    import jax
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            error = e
    if not _from_process_0(error is None):
        raise error or WorkdirLockedError(
            f"process 0 could not lock the workdir {workdir}; its log names the trainer that "
            "holds it.")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def check_still_held(lock: WorkdirLock | None, step: int) -> None:
    """Before a save: raises WorkdirLockedError on every process when the lock file no longer
    names this run's process 0 (another trainer took it over)."""
    ours = lock.still_ours() if lock is not None else True
    if not _from_process_0(ours):
        where = (f"the lock {lock.path} now names {lock.holder()}" if lock
                 else "process 0 lost the lock")
        raise WorkdirLockedError(
            f"another trainer took this workdir over ({where}); this one stops at step {step} "
            "without saving, so that only one trainer writes there.")
