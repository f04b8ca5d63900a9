"""Checks behind the Checkpointer's fallback: what is wrong with a step directory, in one line.

`structure_problem` looks at the layout before anything is read, `ocdbt_problem` opens the
state's OCDBT database, `summary` turns a TensorStore / Orbax exception chain into a short
reason, `agree` combines the verdicts of all processes, and `ORBAX_FILTER` keeps Orbax's log
records of a failed save to one line each (the run reports it as one sentence).
"""
from __future__ import annotations

import logging
import os
import re

import jax
import numpy as np


class _OneLineOrbaxErrors(logging.Filter):
    """Orbax logs a failed background save with its traceback in every thread that sees it;
    the run reports the failure in one sentence (CheckpointSaveError), so Orbax's log records
    keep only their first line and the exception's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
            error = record.exc_info[1]
            text = " ".join(str(error).split())[:300]
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {text})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


ORBAX_FILTER = _OneLineOrbaxErrors()


CORRUPT_DIR = "corrupt"
_STATUS = re.compile(r"\b(OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|NOT_FOUND|INVALID_ARGUMENT|"
                     r"UNKNOWN|INTERNAL|PERMISSION_DENIED|UNAVAILABLE):")


def structure_problem(path) -> str | None:
    """What is missing from a step directory's layout, before anything is read."""
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as e:
        return f"the step directory cannot be listed: {summary(e)}"
    if not names:
        return "the step directory is empty"
    for item, what in (("state", "train state"), ("config", "config"),
                       ("data", "data-iterator")):
        if item not in names:
            return f"its {item}/ item ({what}) is missing"
    if not (path / "state" / "_METADATA").exists():
        return "state/_METADATA (the tree structure) is missing"
    if not (path / "config" / "metadata").exists():
        return "config/metadata is missing"
    return None


def ocdbt_problem(state_dir) -> str | None:
    """Opens the state's OCDBT manifest on its own first: a broken manifest then reads as one
    clear reason, instead of an error in each of the array reads running at once."""
    if not (state_dir / "manifest.ocdbt").exists():
        return None  # not an OCDBT checkpoint; the restore itself will tell
    if "://" in str(state_dir):
        return None  # remote storage: left to the restore
    try:
        import tensorstore as ts  # pylint: disable=g-import-not-at-top
        store = ts.KvStore.open({"driver": "ocdbt",
                                 "base": f"file://{os.path.abspath(str(state_dir))}/"}).result()
        store.list().result()
    except Exception as e:  # pylint: disable=broad-except
        return f"its OCDBT database (state/) cannot be read: {summary(e)}"
    return None


def summary(error: BaseException) -> str:
    """One short line from an exception chain: the innermost storage status message
    (e.g. TensorStore's "OUT_OF_RANGE: Error reading ..."), without specs and local paths."""
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    pick = next((c for c in reversed(chain) if _STATUS.search(str(c))), error)
    text = " ".join(str(pick).split())
    match = _STATUS.search(text)
    if match:
        text = text[match.start():]
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", text)
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    text = re.sub(r' local file "[^"]*/(state/[^"]*)"', r" \1", text)
    if not text:
        text = type(pick).__name__
    elif not match:
        text = f"{type(pick).__name__}: {text}"
    return text if len(text) <= 240 else text[:237] + "..."


def agree(reason: str | None) -> str | None:
    """Every process's verdict on one step, combined: broken anywhere is broken everywhere."""
    if jax.process_count() == 1:
        return reason
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(reason is None, np.int32))
    if reason is None and not np.all(flags):
        bad = [int(i) for i in np.flatnonzero(np.asarray(flags) == 0)]
        return f"process(es) {bad} could not read it; see their logs"
    return reason
