"""The ``loraopt`` dispatcher: every command is reachable, and bad commands fail with a message and exit code 2."""

from __future__ import annotations

import pytest

from loraopt.cli import BENCHMARKS, COMMANDS, main


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in (*COMMANDS, "bench", "optimizers"):
        assert name in out


def test_optimizers_lists_the_registry(capsys):
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    for name in ("adamw", "psi-lora", "scaled-psi-lora", "loko", "lora-plus", "riemannian-adamw"):
        assert name in out


def test_unknown_benchmark_lists_the_benchmarks(capsys):
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in BENCHMARKS)


@pytest.mark.parametrize("argv", [["finetune", "--help"], ["evaluate", "--help"], ["demo", "--help"],
                                  ["bench", "quality", "--help"], ["bench", "linear", "--help"],
                                  ["bench", "online", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_missing_required_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", "minilm"])
    assert exit_info.value.code == 2
    assert "--task" in capsys.readouterr().err


def test_quality_suite_names_are_checked(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "quality", "--suite", "glue"])
    assert exit_info.value.code == 2
    assert "sst2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Paper cuts and bad inputs that need no model
# ---------------------------------------------------------------------------------------------------------------

def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_help_lists_the_benchmarks(flag, capsys):
    assert main(["bench", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loraopt bench NAME")
    for name in BENCHMARKS:
        assert f"  {name} " in out


def test_bench_without_a_name_lists_the_benchmarks_and_exits_2(capsys):
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in BENCHMARKS) and "Traceback" not in err


def test_version_comes_from_the_installed_metadata(capsys):
    import importlib.metadata

    import loraopt

    assert _exit_code(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"loraopt {importlib.metadata.version('loraopt')}"
    assert out == f"loraopt {loraopt.__version__}"  # the package and its metadata agree


def test_unknown_command_exits_2(capsys):
    assert _exit_code(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def _closed_pipe(argv):
    """Run ``python -m loraopt.cli ARGV`` with its stdout reader gone (like `| head` after its lines)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "loraopt.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    return process.wait(timeout=120), err


@pytest.mark.parametrize("argv", [["optimizers"], ["finetune", "--help"], ["bench", "--help"], ["--help"]])
def test_closed_pipe_ends_quietly(argv):
    status, err = _closed_pipe(argv)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert status in (0, 141)


def test_optimizers_into_head():
    """The shell pipeline of the issue: `loraopt optimizers | head -2` shows two lines and no error."""
    import shutil
    import subprocess
    import sys

    if shutil.which("head") is None:
        pytest.skip("no head")
    result = subprocess.run(f"'{sys.executable}' -m loraopt.cli optimizers | head -2", shell=True,
                            capture_output=True, text=True, timeout=120)
    assert len(result.stdout.splitlines()) == 2 and result.stderr == "", result.stderr


def test_every_demo_and_evaluate_option_has_help_text():
    from loraopt_bench.finetune import demo_parser, evaluate_parser, finetune_parser

    for parser in (demo_parser(), evaluate_parser(), finetune_parser()):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{parser.prog} {action.option_strings[0]} has no help text"


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--adapter", "x", "--batch-size", "0"], "--batch-size: must be an integer >= 1, got '0'"),
    (["evaluate", "--adapter", "x", "--batch-size", "1.5"], "--batch-size: expected an integer >= 1"),
    (["evaluate", "--adapter", "x", "--limit", "-1"], "--limit: expected a positive integer or 'all'"),
    (["evaluate"], "the following arguments are required: --adapter"),
    (["demo", "--steps", "0"], "--steps: must be an integer >= 1"),
    (["demo", "--steps", "many"], "--steps: expected an integer >= 1"),
    (["demo", "--methods", "adam"], "invalid choice: 'adam'"),
    (["demo", "--threads", "-2"], "--threads: must be an integer >= 1"),
    (["finetune", "--model", "m", "--task", "t", "--optimizer", "adamw", "--threads", "0"], "--threads"),
    (["finetune", "--model", "m", "--task", "t", "--optimizer", "adamw", "--train-limit", "-5"], "--train-limit"),
    (["finetune", "--model", "m", "--task", "t", "--optimizer", "adamw", "--schedule", "cosine"], "--schedule"),
    (["finetune", "--model", "m", "--task", "t", "--optimizer", "adamw", "--lr", "fast"], "--lr"),
    (["bench", "nope"], "unknown benchmark 'nope'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_demo_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "demo.txt"
    target.write_text("keep\n")
    assert main(["demo", "--no-install", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
    assert target.read_text() == "keep\n"


def test_demo_out_under_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
        (folder / "probe").unlink()
        folder = __import__("pathlib").Path("/sys")  # root ignores the mode bits; /sys is read-only
    except OSError:
        pass
    assert main(["demo", "--no-install", "--out", str(folder / "demo")]) == 2
    err = capsys.readouterr().err
    assert "cannot write in" in err and "Traceback" not in err


def test_finetune_help_documents_exit_status_and_divergence(capsys):
    assert _exit_code(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Exit status:" in out and "diverged" in out and "metrics.json" in out and "--overwrite" in out
