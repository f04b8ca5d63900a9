"""The Checkpointer's fallback past broken checkpoints: steps are tried newest first, each
checked with `checkpoint_checks`, and a broken one is reported in one line and moved aside (the
trainer) or skipped (readers), so that a run resumes from the newest intact step.
"""
from __future__ import annotations

import json
import logging

import jax

from switch_dit_jax.errors import UserError
from switch_dit_jax.train import checkpoint_checks as checks
from switch_dit_jax.train import guard

log = logging.getLogger(__name__)


class NoUsableCheckpointError(UserError):
    """Every checkpoint of a workdir failed validation."""


class IntactRestore:
    """`restore_newest_intact` of the Checkpointer, which it is mixed into: it uses the
    Checkpointer's `directory`, `_manager`, `all_steps`, `saved_config`, `_check_fingerprint`
    and `_restore_state`."""

    def restore_newest_intact(self, abstract_state, shardings, *, move_corrupt: bool):
        """(step, TrainState) of the newest checkpoint that passes validation, or None when the
        directory holds no checkpoint at all.

        Each step is checked newest first: its items and metadata are there and readable, every
        array of the state reads back and is finite, and this process's data-iterator file
        parses. A step that fails is reported in one log line with the reason, then moved to
        `checkpoints/corrupt/STEP` (`move_corrupt`, the trainer) or only skipped (readers:
        sampling, analysis), and the next older step is tried. A step written with a different
        config is not broken: ConfigMismatchError, as from `restore`. With every step broken,
        NoUsableCheckpointError. Every process must call this together; they agree on each
        verdict, and only process 0 moves directories.
        """
        self._manager.wait_until_finished()
        failures = []
        for step in sorted(self.all_steps(), reverse=True):
            state, reason = self._validate(step, abstract_state, shardings)
            reason = checks.agree(reason)
            if reason is None:
                if failures and jax.process_index() == 0:
                    log.warning("restoring step %d, the newest intact checkpoint in %s.", step,
                                self.directory)
                return step, state
            del state
            failures.append((step, reason))
            self._report_broken(step, reason, move_corrupt)
        if not failures:
            return None
        listing = "; ".join(f"step {s}: {r}" for s, r in failures)
        if move_corrupt:
            raise NoUsableCheckpointError(
                f"every checkpoint in {self.directory} is unusable ({listing}); they were moved to "
                f"{self.directory / checks.CORRUPT_DIR}, so running again trains from scratch, or "
                "move an intact one back to resume.")
        raise NoUsableCheckpointError(
            f"no usable checkpoint in {self.directory} ({listing}); train again (--mode=train) or "
            "point --workdir at a run with an intact checkpoint.")

    def _report_broken(self, step: int, reason: str, move: bool) -> None:
        older = [s for s in self.all_steps() if s < step]
        then = f"trying step {max(older)}" if older else "no older checkpoint is left"
        if not move:
            if jax.process_index() == 0:
                log.warning("checkpoint step %d in %s is unusable (%s); skipping it (readers move "
                            "nothing), %s.", step, self.directory, reason, then)
            return
        if jax.process_index() == 0:
            target = self.directory / checks.CORRUPT_DIR / str(step)
            n = 0
            while target.exists():  # the same step broke before: keep both copies
                n += 1
                target = self.directory / checks.CORRUPT_DIR / f"{step}.{n}"
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
            log.warning("checkpoint step %d in %s is unusable (%s); moved it to %s, %s.", step,
                        self.directory, reason, target, then)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"switch_dit_jax: moved checkpoint {step} aside")
        self._manager.reload()  # the moved step is no longer one of ours (nor counted by keep-N)

    def _validate(self, step: int, abstract_state, shardings):
        """(state, None) when step `step` is intact, else (None, one-line reason); raises
        ConfigMismatchError for a readable checkpoint of another config."""
        path = self.directory / str(step)
        reason = checks.structure_problem(path)
        if reason:
            return None, reason
        try:
            meta = self.saved_config(step)
        except Exception as e:  # pylint: disable=broad-except
            return None, f"config/metadata cannot be read: {checks.summary(e)}"
        if not (isinstance(meta, dict) and isinstance(meta.get("fingerprint"), dict)):
            return None, "config/metadata does not describe a checkpoint of this package"
        self._check_fingerprint(step, meta)
        if meta.get("process_count", 1) == jax.process_count():
            name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            data_file = path / "data" / name
            try:
                json.loads(data_file.read_text())
            except FileNotFoundError:
                return None, f"data/{data_file.name} is missing"
            except (ValueError, OSError) as e:
                return None, f"data/{data_file.name} cannot be read: {checks.summary(e)}"
        reason = checks.ocdbt_problem(path / "state")
        if reason:
            return None, reason
        try:
            state = self._restore_state(step, abstract_state, shardings)
        except Exception as e:  # pylint: disable=broad-except
            return None, f"its state does not read back: {checks.summary(e)}"
        bad = guard.nonfinite_parts(state)
        if bad:
            return None, f"its {', '.join(bad)} hold NaN or inf"
        return state, None
