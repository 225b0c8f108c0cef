"""The ``loraopt`` command.

    loraopt finetune --model M --task T --optimizer NAME [options]   LoRA fine-tuning, writes a run directory
    loraopt evaluate --adapter RUN_DIR [--data FILE]                   score a saved adapter
    loraopt demo                                                       5 optimizers on a real model, CPU, minutes
    loraopt bench linear [options]     the synthetic linear task of the PSI-LoRA paper
    loraopt bench online [options]     online (streaming) fine-tuning with LoKO and baselines
    loraopt bench quality --suite S    quality benchmarks on real models (sst2, lm, vision)
    loraopt bench digits [options]     a seconds-long CPU stability probe (scikit-learn digits, LoRA MLP)
    loraopt optimizers                 list the registered optimizers and their hyperparameters
    loraopt --version                  the installed version

``loraopt COMMAND --help`` and ``loraopt bench NAME --help`` show each command's options.
Every command but ``optimizers`` and ``--version`` runs in the ``loraopt_bench`` package and needs the ``bench``
extra: ``pip install "loraopt[bench]"``.
Exit status: 0 success, 2 bad input (a one-line error on stderr; nothing written), 3 a fine-tuning run diverged
(see ``loraopt finetune --help``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from typing import List, Optional

BENCHMARKS = {
    "linear": ("loraopt_bench.linear", "the synthetic linear task of the PSI-LoRA paper (CPU, seconds to minutes)"),
    "online": ("loraopt_bench.online", "online (streaming) fine-tuning: LoKO against tuned baselines"),
    "quality": ("loraopt_bench.quality", "quality suites on real models: --suite sst2 | lm | vision"),
    "digits": ("loraopt_bench.digits", "a seconds-long CPU stability probe (scikit-learn digits, LoRA MLP)"),
}
# Commands whose module parses its own arguments (they take many options; argparse here would duplicate them).
COMMANDS = {
    "finetune": ("loraopt_bench.finetune", "finetune_main", "LoRA fine-tuning of a pretrained model"),
    "evaluate": ("loraopt_bench.finetune", "evaluate_main", "score a saved adapter on a data file"),
    "demo": ("loraopt_bench.finetune", "demo_main", "compare LoKO, the PSI family and AdamW on a real model in minutes"),
}
EXIT_NEEDS_EXTRA = 2  # a missing optional dependency is an installation problem the user fixes, like bad input
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away (`... | head`)


def version() -> str:
    """The installed distribution's version; the package's own when it runs from a source tree."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as distribution_version

        return distribution_version("loraopt")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _list_optimizers() -> int:
    from .optim.registry import OPTIMIZERS, optimizer_hyperparameters

    for name in OPTIMIZERS:
        params = optimizer_hyperparameters(name)
        shown = ", ".join(
            f"{k}" if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in params.items() if k != "kwargs"
        )
        print(f"{name:18s} {shown}")
    return 0


def _bench_help() -> str:
    width = max(len(name) for name in BENCHMARKS)
    rows = "\n".join(f"  {name:{width}s}  {text}" for name, (_, text) in BENCHMARKS.items())
    return (f"usage: loraopt bench NAME [options]\n\nRun a benchmark. NAME is one of:\n{rows}\n\n"
            "`loraopt bench NAME --help` lists NAME's options; results and commands: benchmarks/README.md\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraopt", description="Optimizers for LoRA fine-tuning: benchmarks and tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    parser.add_argument("--version", action="version", version=f"loraopt {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    bench = sub.add_parser("bench", help="run a benchmark (`loraopt bench --help` lists them)", add_help=False)
    bench.add_argument("name", nargs="?", help=f"one of: {', '.join(BENCHMARKS)}")
    sub.add_parser("optimizers", help="list the registered optimizers and their hyperparameters")
    return parser


class MissingExtraError(ImportError):
    """A command needs a package of an extra that is not installed (the message names the extra)."""


# Top-level modules of the packages the 'bench' extra installs (pyproject.toml); scikit-learn imports as sklearn.
BENCH_EXTRA_MODULES = frozenset({"numpy", "tqdm", "matplotlib", "transformers", "peft", "sklearn", "safetensors"})


def _run_bench(module: str, function: str, argv: List[str], command: str) -> int:
    """Run ``module.function(argv)`` of ``loraopt_bench``, imported now; a missing package of the bench extra, at
    import or at run time, raises :class:`MissingExtraError`."""
    try:
        return int(getattr(importlib.import_module(module), function)(argv) or 0)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in BENCH_EXTRA_MODULES:
            raise
        raise MissingExtraError(
            f"loraopt {command} needs the 'bench' extra ({missing} is not installed): pip install \"loraopt[bench]\""
        ) from error


def _run(argv: List[str]) -> int:
    if argv and argv[0] in COMMANDS:
        module, function, _ = COMMANDS[argv[0]]
        return _run_bench(module, function, argv[1:], argv[0])
    if argv and argv[0] == "bench":
        rest = argv[1:]
        if not rest or rest[0] in ("-h", "--help"):
            print(_bench_help(), end="", file=sys.stdout if rest else sys.stderr)
            return 0 if rest else 2
        name = rest[0]
        if name not in BENCHMARKS:
            print(f"loraopt bench: error: unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)} "
                  "(`loraopt bench --help`)", file=sys.stderr)
            return 2
        return _run_bench(BENCHMARKS[name][0], "main", rest[1:], f"bench {name}")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "optimizers":
        return _list_optimizers()
    parser.print_help()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            status = _run(argv)
        except MissingExtraError as error:
            print(f"loraopt: error: {error}", file=sys.stderr)
            return EXIT_NEEDS_EXTRA
        except SystemExit:  # argparse's --help, --version and usage errors
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # inside the try: a closed pipe must not surface at interpreter exit
        return status
    except BrokenPipeError:
        # The reader (e.g. `| head`) has gone: stop quietly. Point stdout at /dev/null so the interpreter's final
        # flush does not raise again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
