"""The pieces the argparse tools share (switch_dit_jax/cli.py)."""
import json

import pytest

from switch_dit_jax import cli


def test_report_json_prints_and_writes_the_same_metrics(tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "m.json"
    cli.report_json({"fid": 1.5, "num_samples": 3}, str(out))
    assert json.loads(out.read_text(encoding="utf-8")) == {"fid": 1.5, "num_samples": 3}
    assert out.read_text(encoding="utf-8").endswith("}\n")
    assert json.loads(capsys.readouterr().out) == {"fid": 1.5, "num_samples": 3}
    cli.report_json({"a": 1}, None)  # no file: printed only
    assert json.loads(capsys.readouterr().out) == {"a": 1}


def _raise(error):
    def main():
        raise error
    return main


def test_run_shows_a_mistake_as_one_line_and_lets_bugs_through():
    with pytest.raises(SystemExit) as e:
        cli.run(_raise(FileNotFoundError("'x.npz' does not exist.")))
    assert e.value.code == "error: 'x.npz' does not exist."
    with pytest.raises(SystemExit) as e:
        cli.run(_raise(OSError("disk full")), (OSError,))
    assert e.value.code == "error: disk full"
    with pytest.raises(OSError, match="disk full"):  # not a mistake of this tool's user
        cli.run(_raise(OSError("disk full")))
    with pytest.raises(KeyError):
        cli.run(_raise(KeyError("bug")))


def test_parser_is_described_by_the_docstring_and_parse_logs_to_stderr(capsys):
    import logging
    p = cli.parser("switch_dit_jax.some.tool", "Does one thing.\n\n    python -m it --x=1\n")
    assert (p.prog, p.description) == ("python -m switch_dit_jax.some.tool", "Does one thing.")
    p.add_argument("--x", type=int, required=True)
    with pytest.raises(SystemExit):  # argparse's own usage message for a missing flag
        cli.parse(p, [])
    assert "the following arguments are required: --x" in capsys.readouterr().err
    root = logging.getLogger()
    kept, level = root.handlers[:], root.level
    root.handlers[:] = []  # pytest's capture handler would make basicConfig a no-op
    try:
        assert cli.parse(p, ["--x=3"]).x == 3
        logging.getLogger("switch_dit_jax").info("progress line")
        captured = capsys.readouterr()
        assert "progress line" in captured.err and "progress line" not in captured.out
    finally:
        for handler in root.handlers:
            root.removeHandler(handler)
        root.handlers[:] = kept
        root.setLevel(level)
