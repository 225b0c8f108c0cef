"""Where the dispatcher calls of one PSI-family step go (issue 12; benchmarks/notes/cost.md "Round 9").

Counts every aten call of one ``optimizer.step()`` (after three warm-up steps, 64 rows per batch) on the toy model of
``tests/test_step_launches.py`` (8 blocks of three adapted shapes, so three shape buckets), on the CPU, and sorts them
into metadata (views: no kernel on a GPU), guards (the finiteness tests and the selections that keep a failing layer
unchanged without a host synchronisation), data movement (stacks, copies, casts, fills) and math.  On a GPU in eager
mode every call that is not metadata is one kernel launch.  The sorting is by op name, so approximate: a ``where``
that guards a division by zero counts as a guard, as does the ``abs`` of a norm.

    python scripts/step_kernel_census.py
"""

from __future__ import annotations

import collections
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_step_launches  # noqa: E402  (its toy model and counter: the ones the launch-count tests use)

METADATA = {"view", "expand", "unsqueeze", "_unsafe_view", "transpose", "unbind", "diagonal", "select", "slice", "t",
            "permute", "squeeze", "alias", "as_strided", "detach", "lift_fresh", "_reshape_alias", "split",
            "split_with_sizes", "chunk", "narrow"}
GUARDS = {"ne", "abs", "eq", "bitwise_and", "bitwise_or", "bitwise_not", "all", "any", "where", "isfinite", "isnan",
          "isinf", "logical_and", "logical_or", "logical_not"}
DATA_MOVEMENT = {"stack", "cat", "clone", "_to_copy", "copy_", "_foreach_copy_", "zeros", "zeros_like", "new_zeros",
                 "ones", "eye", "full", "fill_", "empty", "empty_like", "new_empty", "scalar_tensor"}


def census(name: str, hyperparameters: dict, blocks: int = 8, rows: int = 64) -> collections.Counter:
    """The aten calls of one ``step()`` of ``create_optimizer(name, ...)`` on the toy model, after three warm-up steps."""
    return test_step_launches.step_calls(name, hyperparameters, blocks, rows)


def main() -> None:
    warnings.simplefilter("ignore")
    for name, hyperparameters in (("psi-lora", {}), ("proj-psi-lora", {}), ("scaled-psi-lora", {}),
                                  ("proj-psi-lora", dict(normalize="full"))):
        calls = census(name, hyperparameters)
        total = sum(calls.values())
        kernels = total - sum(n for op, n in calls.items() if op in METADATA)
        guards = sum(n for op, n in calls.items() if op in GUARDS)
        moves = sum(n for op, n in calls.items() if op in DATA_MOVEMENT)
        print(f"{name} {hyperparameters or '(defaults)'}: {total} dispatcher calls, {kernels} kernels: "
              f"guards {guards} ({guards / kernels:.0%}), data movement {moves} ({moves / kernels:.0%}), "
              f"math {kernels - guards - moves}")


if __name__ == "__main__":
    main()
