"""The console script: list, demo, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

from attnkit import cli


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "identity" in out and "qwen2_5_vl" in out


def test_demo_prints_both_outputs(capsys):
    assert cli.main(["demo", "--family", "llava", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "row 0 unwrapped:" in out and "row 1  identity:" in out
    assert "identical outputs: True" in out


def test_bad_method_is_one_line_exit_2(capsys):
    assert cli.main(["demo", "--family", "llava", "--method", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnkit: error: unknown method 'nope'") and "\n" not in err
    assert cli.main(["demo", "--methods", "none,nope"]) == 2  # the testbed demo checks names before running
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnkit: error: unknown method 'nope'") and "\n" not in err
    assert cli.main(["demo", "--family", "llava", "--method-arg", "p=0.5"]) == 2
    assert "identity: unknown argument 'p'" in capsys.readouterr().err


def test_console_script_runs_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "attnkit.cli", "demo", "--family", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown family 'nope'" in proc.stderr


def test_method_arg_parsing():
    assert cli._parse_method_args(["a=1", "b=0.5", "c=true", "d=none", "e=x"]) == {
        "a": 1, "b": 0.5, "c": True, "d": None, "e": "x"}
