"""What the `python -m` tools built on argparse share (`eval`, `eval.t2i`, `data.coco`): a
parser described by the tool's docstring, progress logged to stderr (stdout carries the result),
the metrics printed as JSON and kept in a file, and a user's mistake shown as one line instead
of a traceback. The absl tools that restore a run directory share `analysis/cli.py` instead."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable


def parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m <module>`, its description the first paragraph of `doc` (the
    module docstring; `prog` is spelled out because `__name__` is "__main__" under -m)."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The parsed flags, once they are valid; from then on the tool's log lines go to stderr."""
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    return args


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
