"""What the `python -m` tools built on argparse share (`eval`, `eval.t2i`, `data.coco`): the
metrics printed as JSON and kept in a file, and a user's mistake shown as one line instead of a
traceback. The absl tools that restore a run directory share `analysis/cli.py` instead."""
from __future__ import annotations

import json
import os
from typing import Any, Callable


def report_json(result: dict, out: str | None) -> None:
    """Prints `result` as JSON and, when `out` is given, writes the same text there (its folder
    is made: a fresh run directory is the usual place)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def run(main: Callable[[], Any],
        mistakes: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> None:
    """Calls `main()`; the errors in `mistakes` (bad files, flags or weights, each already one
    sentence naming the value and the fix) exit with `error: <sentence>` and no traceback."""
    try:
        main()
    except mistakes as e:
        raise SystemExit(f"error: {e}") from None
