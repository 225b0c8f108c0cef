"""The batched PSI-family step does no per-layer work: its dispatcher calls (one launch each on a GPU in eager mode)
do not grow with the number of layers of a model whose layers fall into a fixed set of shape buckets.

Design bound: the step's tensor work is per shape bucket (one stack, one functional step, one ``_foreach_*`` write
per bucket); what is per layer stays on the host (Python lists of tensors handed to one ``_foreach_*`` or ``stack``
call).  So adding blocks of the same shapes adds no dispatcher call, and the tests allow less than one call per
added block: a single per-adapter operation (a view, a cast, a norm), which costs at least three calls per block
here, fails them.  ``benchmarks/notes/cost.md`` ("Per-layer work left") has the counts on a Llama-shaped model.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

peft = pytest.importorskip("peft")

import loraopt  # noqa: E402
from loraopt.lora.capture import LayerObservation  # noqa: E402
from loraopt.optim.distributed import DistributedContext  # noqa: E402
from loraopt.optim.psi_gather import clip_norm, stacked_rows  # noqa: E402


class Blocks(nn.Module):
    """``n`` blocks of three adapted projections in three shapes (16 -> 32 -> 16 -> 16), and a trainable head."""

    def __init__(self, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(up=nn.Linear(16, 32), down=nn.Linear(32, 16), mix=nn.Linear(16, 16))) for _ in range(n)
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b["mix"](b["down"](torch.tanh(b["up"](x)))))
        return self.head(x)


def _model(n: int):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down", "mix"], modules_to_save=["head"])
    return peft.get_peft_model(Blocks(n), cfg)


class _Count(TorchDispatchMode):
    """Dispatcher calls by op name (``scripts/step_kernel_census.py`` sorts them)."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _calls_per_step(name: str, hp: dict, blocks: int, rows: int) -> int:
    """Dispatcher calls of one ``step()`` after three warm-up steps."""
    return sum(step_calls(name, hp, blocks, rows).values())


def step_calls(name: str, hp: dict, blocks: int, rows: int) -> collections.Counter:
    """Dispatcher calls of one ``step()`` after three warm-up steps, by op name."""
    model = _model(blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = loraopt.create_optimizer(name, model, **hp)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(rows, 16, generator=g), torch.randint(0, 3, (rows,), generator=g)

    def backward():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    for _ in range(3):
        backward()
        opt.step()
    backward()
    count = _Count()
    with count:
        opt.step()
    return count.calls


# Library defaults (momentum 0.9 in balanced SVD form, clipping 1.0, Adam on the head), each gradient form:
# 64 rows hold the dense G (rows mode) or project it (stream mode, K = 0); 4 rows keep the rows (K >= 1).
CASES = [
    ("psi-lora", dict(inner_iters=0), 64),
    ("psi-lora", {}, 64),
    ("psi-lora", {}, 4),
    ("psi-lora", dict(inner_iters=0), 4),
    ("proj-psi-lora", {}, 64),
    ("proj-psi-lora", {}, 4),
    ("scaled-psi-lora", {}, 64),
    ("scaled-psi-lora", dict(inner_iters=1, metric="shampoo"), 4),
    ("psi-lora", dict(momentum_balance="polar"), 64),  # the fixed k x k iterations: once per step, not per bucket
]

_ADDED_BLOCKS = 6  # 2 -> 8 blocks: 18 more adapters


@pytest.mark.parametrize("name,hp,rows", CASES, ids=[f"{n}-{hp}-{r}rows" for n, hp, r in CASES])
def test_step_dispatcher_calls_do_not_grow_with_the_number_of_layers(name, hp, rows):
    small = _calls_per_step(name, hp, 2, rows)
    large = _calls_per_step(name, hp, 2 + _ADDED_BLOCKS, rows)
    assert large - small < _ADDED_BLOCKS, (
        f"{name} {hp} ({rows} rows): {small} dispatcher calls per step with 2 blocks, {large} with "
        f"{2 + _ADDED_BLOCKS}: per-layer work is back in the step"
    )


def test_the_per_layer_reference_path_does_grow():
    """The counter sees per-layer work: ``foreach=False`` (one functional step per layer) grows by hundreds."""
    small = _calls_per_step("psi-lora", dict(foreach=False), 2, 64)
    large = _calls_per_step("psi-lora", dict(foreach=False), 2 + _ADDED_BLOCKS, 64)
    assert large - small > 100 * _ADDED_BLOCKS


def _observation(n: int, d_in: int, d_out: int, scaling: float, seed: int, chunks: int = 1) -> LayerObservation:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    s = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    obs = LayerObservation(scaling=scaling, n_rows=n, pairs=chunks)
    obs.x_rows, obs.g_rows = list(x.chunk(chunks)), list((s * scaling).chunk(chunks))
    return obs


@pytest.mark.parametrize("chunks,scalings", [(1, (2.0, 2.0, 2.0)), (2, (2.0, 2.0, 2.0)), (1, (2.0, 0.5, 1.0))])
def test_stacked_rows_equal_each_layers_rows(chunks, scalings):
    observations = [_observation(5, 16, 32, s, seed=i, chunks=chunks) for i, s in enumerate(scalings)]
    S, X = stacked_rows(observations)
    for i, obs in enumerate(observations):
        x, s = obs.rows()
        assert torch.equal(S[i], s) and torch.equal(X[i], x)


def test_clip_norm_of_row_buckets_equals_the_per_layer_sum():
    """The clipping norm over layers holding rows, one Gram product per (shape, rows) group, equals the norm from
    each layer's own ``grad_sq_norm`` in float64 (a single layer, and rows longer than the dense route's bound,
    included)."""
    observed = [(None, _observation(4, 16, 32, 2.0, seed=i)) for i in range(3)]
    observed += [(None, _observation(4, 16, 16, 2.0, seed=10)), (None, _observation(40, 16, 16, 2.0, seed=11))]
    observed += [(None, _observation(40, 16, 16, 2.0, seed=12))]
    norm, accumulated = clip_norm([(None, observed, [])], DistributedContext(None))
    expected = torch.stack([obs.grad_sq_norm() for _, obs in observed]).sum().sqrt()
    assert not accumulated
    torch.testing.assert_close(norm, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("rows", [4, 64])  # rows kept, or the dense G (dense="auto")
def test_batched_shampoo_statistics_equal_each_layers(rows):
    """Rows mode: the Shampoo statistics finished per shape group (``observations_of``) equal those of
    ``observation`` layer by layer, in float64."""
    import dataclasses

    from loraopt.lora.capture import GradientCapture
    from loraopt.lora.layers import find_lora_layers

    model = _model(3).double()
    layers = find_lora_layers(model)
    capture = GradientCapture(layers, mode="rows", shampoo_stats=True, dense="auto")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(rows, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (rows,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    expected = []
    for layer in layers:
        copy = dataclasses.replace(capture.observations[layer.index])
        capture._finish_shampoo(copy)
        expected.append(copy)
    got = capture.observations_of(layers)
    assert any(o.G is None for o in got) == (rows == 4)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o.shampoo_in, e.shampoo_in, rtol=1e-12, atol=0)
        torch.testing.assert_close(o.shampoo_out, e.shampoo_out, rtol=1e-12, atol=0)
    capture.remove()


def test_the_kernel_census_script_runs_against_the_current_step():
    """``scripts/step_kernel_census.py`` (notes/cost.md "Round 9") runs against the current step and each of its
    groups (views, guards, data movement) is present, with kernels besides the views."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "step_kernel_census.py"
    spec = importlib.util.spec_from_file_location("step_kernel_census", path)
    census = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(census)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calls = census.census("proj-psi-lora", {})
    assert all(sum(n for op, n in calls.items() if op in group) > 0
               for group in (census.METADATA, census.GUARDS, census.DATA_MOVEMENT))
    assert sum(calls.values()) > sum(n for op, n in calls.items() if op in census.METADATA)
