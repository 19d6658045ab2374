"""The command line's own plumbing: usage errors are one line with exit code 2; --help exits 0."""

import subprocess
import sys

from backprop_hooks import cli


def test_usage_error_is_one_line_and_exit_2(capsys):
    assert cli.main(["explain", "--topk", "abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["backprop-hooks explain: error: argument --topk: invalid int value: 'abc'"]
    assert cli.main(["no-such-command"]) == 2


def test_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "explain" in out and "finetune" in out


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "backprop_hooks", "explain", "--topk", "0x"], capture_output=True, text=True
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
