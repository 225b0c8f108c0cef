"""The ``loraopt`` command.

    loraopt finetune --model M --task T --optimizer NAME [options]   LoRA fine-tuning, writes a run directory
    loraopt evaluate --adapter RUN_DIR [--data FILE]                   score a saved adapter
    loraopt demo                                                       4 optimizers on a real model, CPU, minutes
    loraopt bench linear [options]     the synthetic linear task of the PSI-LoRA paper
    loraopt bench online [options]     online (streaming) fine-tuning with LoKO and baselines
    loraopt bench quality --suite S    quality benchmarks on real models (sst2, lm, vision)
    loraopt optimizers                 list the registered optimizers and their hyperparameters

``loraopt COMMAND --help`` and ``loraopt bench NAME --help`` show each command's options.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from typing import List, Optional

BENCHMARKS = {
    "linear": "loraopt.bench.linear",
    "online": "loraopt.bench.online",
    "quality": "loraopt.bench.quality",
}
# Commands whose module parses its own arguments (they take many options; argparse here would duplicate them).
COMMANDS = {
    "finetune": ("loraopt.bench.finetune", "finetune_main", "LoRA fine-tuning of a pretrained model"),
    "evaluate": ("loraopt.bench.finetune", "evaluate_main", "score a saved adapter on a data file"),
    "demo": ("loraopt.bench.finetune", "demo_main", "compare LoKO, Scaled PSI-LoRA, PSI-LoRA and AdamW in minutes"),
}


def _list_optimizers() -> int:
    from .optim.registry import OPTIMIZERS, optimizer_hyperparameters

    for name in OPTIMIZERS:
        params = optimizer_hyperparameters(name)
        shown = ", ".join(
            f"{k}" if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in params.items() if k != "kwargs"
        )
        print(f"{name:18s} {shown}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="loraopt", description="Optimizers for LoRA fine-tuning: benchmarks and tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    bench = sub.add_parser("bench", help="run a benchmark (see `loraopt bench NAME --help`)", add_help=False)
    bench.add_argument("name", nargs="?", help=f"one of: {', '.join(BENCHMARKS)}")
    sub.add_parser("optimizers", help="list the registered optimizers and their hyperparameters")
    if argv and argv[0] in COMMANDS:
        module, function, _ = COMMANDS[argv[0]]
        return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)
    args, rest = parser.parse_known_args(argv)
    if args.command == "optimizers":
        return _list_optimizers()
    if args.command == "bench":
        if args.name not in BENCHMARKS:
            print(f"loraopt bench: choose one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        module = importlib.import_module(BENCHMARKS[args.name])
        return int(module.main(rest) or 0)
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
