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
