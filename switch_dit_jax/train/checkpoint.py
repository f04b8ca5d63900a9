"""Checkpoints of (TrainState, data-iterator position, config) and SIGTERM-driven preemption.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}` written by an Orbax CheckpointManager.
On a local or POSIX file system Orbax writes each step into `<step>.orbax-checkpoint-tmp` and
renames it on commit (on GCS it writes a `commit_success.txt` marker instead), so a run killed
mid-save leaves the previous step as the newest restorable one; the leftover temporary directory
is ignored when listing steps and deleted by the next run's first save.

Nothing non-finite is saved (`save` checks the state on the device first). Resuming goes
through `restore_newest_intact` (checkpoint_fallback.py): the newest step that is structurally
whole, reads back completely and is finite; broken steps are moved to
`checkpoints/corrupt/<step>` by the trainer (only skipped by readers), each with a one-line
reason. A background save that fails is raised as a one-sentence CheckpointSaveError as soon as
`raise_if_save_failed` sees it.

A run may resume with another number of processes: the train state is resharded exactly, but
grain's per-process iterator positions belong to the old shard layout, so the data stream
restarts with a seed derived from (data.seed, step) and a WARNING says so (`resume_data_seed`).
"""
from __future__ import annotations

import json
import os
import logging
import threading

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from switch_dit_jax.errors import UserError
from switch_dit_jax.train import checkpoint_checks as checks
from switch_dit_jax.train import guard
from switch_dit_jax.train.checkpoint_fallback import IntactRestore
from switch_dit_jax.train.fingerprint import (ConfigMismatchError, config_fingerprint,
                                               fingerprint_diff)

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1


class CheckpointSaveError(UserError):
    """A (background) save failed; the previous checkpoint is still the latest."""


def resumed_data_seed(seed: int, step: int) -> int:
    """The data seed of a run resumed at `step` with a different number of processes.

    A fresh stream seeded with data.seed alone would replay the batches the run started with;
    mixing in the step gives each such resume its own order, the same on every process.
    """
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0])


class Checkpointer(IntactRestore):
    """Saves and restores TrainState + grain iterator + config under `<workdir>/checkpoints`;
    `restore_newest_intact` (the fallback past broken steps) comes from `IntactRestore`.

    Every process of a multi-process run must make the same calls (Orbax synchronises them).
    """

    def __init__(self, workdir: str, config, *, max_to_keep: int, async_save: bool = True,
                 read_only: bool = False):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep!r} must be a positive integer "
                             "(config.train.keep_checkpoints).")
        # Orbax refuses relative paths; --workdir=runs/x is what users type.
        self.directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
        self.config = config
        every = config.train.get("checkpoint_every") or 0
        self._every = int(every) if every > 0 else 0
        self._last_step = config.train.get("num_steps")
        options = ocp.CheckpointManagerOptions(
            # Orbax warns and overrides these two when read-only; pass what it would set.
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,  # the interval is decided in save()
            enable_async_checkpointing=async_save,
            # Not on opening: a process that only restores (e.g. sampling from a live run) must
            # not delete the temporary directory of a save in progress; see _remove_leftovers.
            cleanup_tmp_directories=False,
            read_only=read_only,
            create=not read_only)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.PyGrainCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})
        self._read_only = read_only
        self._saved_once = False
        self._saving_step = None  # the step of the async save in flight, for error messages
        # The seed this run's data iterator was built with, recorded by save(): a same-count
        # resume must rebuild the iterator with it (see resume_data_seed).
        self.data_seed = int(config.data.get("seed") or 0)
        # A run that ends without close() (an exception, a forgotten call) would otherwise lose
        # its last async save: interpreter exit shuts down the thread pools Orbax commits with
        # ("cannot schedule new futures after shutdown") and leaves only a temporary directory.
        # threading's exit hooks run before those pools shut down; atexit's run after.
        # (CPython 3.12.0-3.12.1 forbid new threads there too, so only close() commits.)
        # The hook holds the manager, not self: the Checkpointer may be gone while a save is not.
        self._pending = {"manager": None if read_only else self._manager}
        register = getattr(threading, "_register_atexit", None)
        if register is not None and not read_only:
            register(_wait_at_exit, self._pending)
        if checks.ORBAX_FILTER not in logging.getLogger("absl").filters:
            logging.getLogger("absl").addFilter(checks.ORBAX_FILTER)

    # -- queries ---------------------------------------------------------------------------------

    def _complete_steps(self) -> list[int]:
        # The manager lists a step as soon as its save *starts*; only a committed (renamed or
        # marked) directory is a checkpoint we may restore.
        return [s for s in self._manager.all_steps()
                if ocp.path.step.is_path_finalized(self.directory / str(s))]

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self._complete_steps()
        return max(steps) if steps else None

    def all_steps(self) -> list[int]:
        return sorted(self._complete_steps())

    # -- save ------------------------------------------------------------------------------------

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Saves when `step` is a multiple of train.checkpoint_every, is train.num_steps, or `force`.

        Every process must call it with the same step. Returns whether a save was started.
        With async saving, the device-to-host copy and the
        data-iterator state are taken before returning, so training may go on (and advance the
        iterator) at once; the files are written in the background, and the next save waits.
        Raises guard.NonFiniteStateError, and saves nothing, when the state holds NaN or inf,
        and CheckpointSaveError when an earlier background save failed.
        """
        if self._read_only:
            raise ValueError(f"this Checkpointer for {self.directory} is read-only; open it with "
                             "read_only=False to save.")
        self.raise_if_save_failed()
        step = int(step)
        due = (self._every and step % self._every == 0) or step == self._last_step
        if not (force or due):
            return False
        known = self._manager.all_steps()
        if step in known:
            # E.g. preempted right after resuming: the checkpoint for this step is already there
            # (or being written) and holds the same state.
            log.info("checkpoint for step %d already exists in %s; not saving it again.", step,
                     self.directory)
            return False
        if known and step < max(known):
            raise ValueError(f"cannot save step {step} into {self.directory} because it already "
                             f"holds the later step {max(known)}; resume from the latest checkpoint "
                             "or use a new --workdir.")
        bad = guard.nonfinite_parts(state)
        if bad:
            raise guard.NonFiniteStateError(step, bad)
        if not self._saved_once:
            self._remove_leftovers()
            self._saved_once = True
        meta = {"format": _FORMAT_VERSION,
                "fingerprint": config_fingerprint(self.config),
                "process_count": jax.process_count(),
                "data_seed": self.data_seed,
                "config": json.loads(self.config.to_json_best_effort())}
        started = self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.PyGrainCheckpointSave(data_iterator),
            config=ocp.args.JsonSave(meta)))
        if started:
            self._saving_step = step
        return started

    def raise_if_save_failed(self) -> None:
        """Raises CheckpointSaveError as soon as a background save has failed; cheap enough to
        call after every train step (it only looks at Orbax's finalize thread).

        Orbax keeps such an error inside its finalize thread until the next save or wait; this
        surfaces it while the previous checkpoint is still the latest one.
        """
        try:
            ref = self._manager._finalize_thread  # pylint: disable=protected-access
            failed = ref.map(lambda t: t is not None and not t.is_alive()
                             and getattr(t, "exception", None) is not None)
        except AttributeError:  # another Orbax version: the next save or wait() reports it
            failed = False
        if failed:
            self.wait()

    def _save_failed(self, error: BaseException) -> CheckpointSaveError:
        step = self._saving_step
        self._saving_step = None
        latest = self.latest_step()
        first = " ".join(str(error).split())[:300] or type(error).__name__
        what = f"step {step}" if step is not None else "a checkpoint"
        still = (f"the latest checkpoint is still step {latest}" if latest is not None
                 else "there is no complete checkpoint yet")
        return CheckpointSaveError(
            f"the background save of {what} to {self.directory} failed "
            f"({type(error).__name__}: {first}); {still}; fix the storage (space, permissions, "
            "quota) and run again to resume.")

    def _remove_leftovers(self) -> None:
        # Temporary directories of saves that a crash interrupted; this process is now the writer
        # of the directory, so none of them can still be in progress. Orbax's save starts with a
        # barrier, so the other processes write nothing before process 0 is done here.
        if jax.process_index() == 0:
            for path in self.directory.glob(f"*{ocp.path.step.TMP_DIR_SUFFIX}*"):
                log.info("removing %s, left behind by an interrupted save.", path)
                path.rmtree()

    def wait(self) -> None:
        """Blocks until pending saves are committed; a background save's error becomes a
        CheckpointSaveError (one sentence; the Orbax error is its __cause__)."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # pylint: disable=broad-except
            raise self._save_failed(e) from e
        self._saving_step = None

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads; call before the process exits."""
        self._manager.wait_until_finished()
        self._manager.close()
        self._pending["manager"] = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore ---------------------------------------------------------------------------------

    def saved_config(self, step: int | None = None) -> dict:
        """The metadata saved with a checkpoint: format, fingerprint, process_count, full config."""
        step = self._resolve_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]

    def resume_data_seed(self, step: int | None = None) -> int:
        """The seed to build this run's loader with before `restore(..., step)` (None = latest).

        With the process count the checkpoint was written with, it is the seed its iterator was
        built with (data.seed, unless an earlier resume changed the process count), so restore()
        continues that stream exactly. With another count, it is `resumed_data_seed(data.seed,
        step)`. Either way, later saves of this Checkpointer record it.
        """
        step = self._resolve_step(step)
        meta = self.saved_config(step)
        base = int(self.config.data.get("seed") or 0)
        if meta.get("process_count", 1) == jax.process_count():
            self.data_seed = int(meta.get("data_seed", base))
        else:
            self.data_seed = resumed_data_seed(base, step)
        return self.data_seed

    def _resolve_step(self, step: int | None) -> int:
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"there is no complete checkpoint in {self.directory}; train "
                                        "from scratch or point --workdir at a run that has one.")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"there is no complete checkpoint for step {step} in "
                                    f"{self.directory}; the complete ones are {steps or 'none'}.")
        return int(step)

    def restore(self, abstract_state, shardings, data_iterator, step: int | None = None):
        """Returns the TrainState of `step` (None = latest) placed with `shardings`.

        `abstract_state` gives the tree structure, shapes and dtypes (e.g. from `state_shardings`);
        `shardings` is a matching tree of Shardings or one Sharding for every leaf.
        `data_iterator` (a grain DataLoader iterator, or None to skip) is set to the saved position
        when this run has the process count the checkpoint was written with; build its loader
        with `resume_data_seed(step)`. With another count the iterator is left as it is (fresh,
        for the new layout) and a WARNING says that the data order does not carry over exactly.
        Raises ConfigMismatchError when the checkpoint's fingerprint differs from this config's.
        This reads exactly that step; `restore_newest_intact` falls back past broken ones.
        """
        step = self._resolve_step(step)
        meta = self.saved_config(step)
        self._check_fingerprint(step, meta)
        if data_iterator is not None:
            # The iterator first: its restore starts prefetching, which overlaps the state read.
            self._restore_data_with(step, data_iterator, meta)
        return self._restore_state(step, abstract_state, shardings)

    def _check_fingerprint(self, step: int, meta: dict) -> None:
        diffs = fingerprint_diff(meta.get("fingerprint", {}), config_fingerprint(self.config))
        if diffs:
            raise ConfigMismatchError(
                f"the checkpoint at step {step} in {self.directory} was written with a different "
                f"config ({'; '.join(diffs)}); restore the config it was trained with, or use a new "
                "--workdir to start a separate run.")

    def _restore_state(self, step: int, abstract_state, shardings):
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda _: shardings, abstract_state)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, shardings)
        return self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]

    def restore_data(self, step: int, data_iterator) -> None:
        """Sets `data_iterator` to the position saved at `step` (see `restore`)."""
        self._restore_data_with(int(step), data_iterator, self.saved_config(step))

    def _restore_data_with(self, step: int, data_iterator, meta: dict) -> None:
        saved_count = meta.get("process_count", 1)
        if saved_count != jax.process_count():
            self._warn_data_restarts(step, saved_count)
        else:
            self._restore_data(step, data_iterator, meta)

    def _warn_data_restarts(self, step: int, saved_count: int) -> None:
        # Grain keeps one position per process in a per-process shuffle; no mapping takes the
        # positions of one layout to the other without repeating or skipping records.
        if jax.process_index() == 0:
            base = int(self.config.data.get("seed") or 0)
            log.warning(
                "the checkpoint at step %d in %s was written by %d process(es) and this run has "
                "%d: the train state (parameters, EMA, optimizer state, step) is restored exactly, "
                "but the data order does not carry over exactly: the data iterator restarts for "
                "the new process layout with seed %d, derived from (data.seed=%d, step=%d).",
                step, self.directory, saved_count, jax.process_count(), self.data_seed, base, step)

    def _restore_data(self, step: int, data_iterator, meta: dict) -> None:
        try:
            self._manager.restore(step, args=ocp.args.Composite(
                data=grain.PyGrainCheckpointRestore(data_iterator)))
        except ValueError as e:
            # grain checks the worker count, sampler (seed, size, sharding) and source repr, and
            # reports the mismatch over several lines.
            saved = meta.get("config", {}).get("data", {}).get("num_workers")
            now = self.config.data.get("num_workers")
            base_seed = int(self.config.data.get("seed") or 0)
            saved_seed = meta.get("data_seed", base_seed)
            if saved != now:
                hint = (f"data.num_workers was {saved} and is {now}, which grain cannot convert; "
                        f"set it back to {saved}")
            elif saved_seed != base_seed:
                hint = (f"its iterator was built with seed {saved_seed} (reseeded when a resume "
                        "changed the process count); build the loader with "
                        "seed=Checkpointer.resume_data_seed()")
            else:
                hint = "keep the data source, data.seed and the batch size as they were"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the data-iterator state at step {step} in {self.directory} does not "
                             f"fit this run's data loader ({first}): {hint}, or use a new "
                             "--workdir.") from e


def _wait_at_exit(pending: dict) -> None:
    manager = pending.get("manager")
    if manager is not None:
        try:
            manager.wait_until_finished()
        except Exception:  # pylint: disable=broad-except
            log.exception("the last checkpoint save failed while the process was exiting.")
