"""The launch-bound levers of the PSI-family step (issue 12): no host synchronisation in ``step()``, shape buckets
for every gradient form, one batched SVD for the momentum balancing, and the optional ``torch.compile`` of the
functional step, each tested equal to the readable path in float64."""

from __future__ import annotations

import collections
import shutil
import traceback
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import loraopt
import loraopt.optim.psi_step as psi_step_module
from loraopt.functional.psi import CompiledPSIStep, balance_many, balance_svd, psi_step, resolve_compile

from loraopt_bench.common import feed

from test_fast_paths import _batch, _rel, _state_tensors, _tower, _train

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------------------ sync detector

# Operators that make the host wait for the device on CUDA: a scalar read (``.item()``, ``bool(t)``, ``int(t)``,
# ``float(t)``), data-dependent output shapes, linear algebra that checks its error flags on the host, and a tensor
# built from host values (a host-to-device copy).
SYNCING = {
    "_local_scalar_dense", "is_nonzero", "item", "nonzero", "nonzero_static", "masked_select", "_unique2",
    "unique_dim", "unique_consecutive", "repeat_interleave", "_linalg_svd", "_linalg_eigh", "linalg_eigh",
    "linalg_inv", "linalg_cholesky", "linalg_solve", "cholesky", "lift_fresh", "_assert_async",
}
# Host memory read on purpose: the landed non-blocking copies of the skip and solve-fallback counters.
HOST_COPY_READERS = {"_adopt_host_copies", "_warn_on_solve_fallbacks"}


class SyncCounter(TorchDispatchMode):
    """Counts the syncing operators dispatched inside the block (by name), except reads of ``host`` tensors (CPU by
    design on every device: torch.optim-style step counters) and of the landed host copies."""

    def __init__(self, host=()):
        super().__init__()
        self.host = list(host)
        self.hits = collections.Counter()
        self.where = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNCING and not (args and any(args[0] is t for t in self.host)):
            stack = traceback.extract_stack()
            if not any(frame.name in HOST_COPY_READERS for frame in stack):
                self.hits[name] += 1
                self.where.setdefault(name, "".join(traceback.format_list(stack[-6:-1])))
        return func(*args, **(kwargs or {}))


def _host_counters(opt):
    return [st["step"] for st in opt.state.values() if "step" in st]


def _steps_counting_syncs(name, kwargs, steps, *, inject=None, monkeypatch=None):
    """Warm up (the first step allocates state and checks once whether .grad was edited), then count the syncing
    operators of ``steps`` steps with the counters on their accelerator path."""
    model = _tower(torch.float32)
    opt = loraopt.create_optimizer(name, model, **kwargs)
    opt.read_cpu_counts_at_once = False  # the CPU takes the path of a GPU: deferred, non-blocking counter reads
    opt.skip_check_interval = 4  # several counter reads (and polls) inside the window
    if monkeypatch is not None:
        monkeypatch.setattr(psi_step_module, "_FALLBACK_CHECK_INTERVAL", 4)
    svd_calls = []
    for t in range(2 + steps):
        x, y = _batch(32, 100 + t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if t < 2:
            opt.step()
            continue
        if inject is not None:
            inject(opt)
        counter = SyncCounter(_host_counters(opt))
        with counter:
            opt.step()
        svd_calls.append(counter.hits.pop("_linalg_svd", 0))
        assert not counter.hits, f"step {t}: host synchronisation {dict(counter.hits)} at\n" + "\n".join(
            counter.where[k] for k in counter.hits)
    return opt, svd_calls


SYNC_CASES = [
    # (registry name, kwargs, SVD calls per step: the balanced-SVD momentum's one batched call)
    ("psi-lora", dict(lr=0.1, inner_iters=0, momentum=0.9), 1),
    ("psi-lora", dict(lr=0.1, inner_iters=1, momentum=0.9, max_grad_norm=1.0), 1),
    ("psi-lora", dict(lr=0.1, inner_iters=1, momentum=0.9, momentum_balance="norm"), 0),
    ("psi-lora", dict(lr=0.1, inner_iters=2, momentum=0.0, weight_decay=0.01, dense="never"), 0),
    ("proj-psi-lora", dict(lr=0.1), 0),
    ("proj-psi-lora", dict(lr=0.1, inner_iters=0), 0),
    ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2), 1),
    ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, metric="shampoo", inner_iters=1, momentum_balance="norm"), 0),
    # The sync-free balancing: no SVD, nothing read on the host.
    ("psi-lora", dict(lr=0.1, inner_iters=1, momentum=0.9, momentum_balance="polar"), 0),
    ("psi-lora", dict(lr=0.1, inner_iters=0, momentum=0.9, momentum_balance="polar"), 0),
    ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, momentum_balance="polar"), 0),
]


@pytest.mark.parametrize("case", range(len(SYNC_CASES)), ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SYNC_CASES)])
def test_step_makes_no_host_synchronisation(case, monkeypatch):
    """After warm-up no step reads a device value on the host, copies host values to the device or runs an op whose
    output shape depends on the data; the only syncing op left is the momentum balancing's one batched SVD per step
    (``linalg.svd`` checks its flags on the host), run last in the step.  12 steps cross the (shortened) intervals
    of the skip and solve-fallback counter reads."""
    name, kwargs, svds = SYNC_CASES[case]
    opt, svd_calls = _steps_counting_syncs(name, kwargs, 12, monkeypatch=monkeypatch)
    assert svd_calls == [svds] * 12
    assert opt.skipped_steps == 0


def test_the_sync_detector_sees_a_reintroduced_sync():
    """The detector is not vacuous: an ``.item()``, a ``bool()`` of a device flag or a per-layer host-to-device copy
    added to the step makes the count non-zero."""
    for bad in (lambda t: t.item(), lambda t: bool(t.all()), lambda t: torch.tensor([1.0, 2.0]) + t.float().sum()):
        def inject(opt, bad=bad):
            original = opt._count_step

            def count_step(layers, ok):
                bad(ok)
                return original(layers, ok)

            opt._count_step = count_step

        with pytest.raises(AssertionError, match="host synchronisation"):
            _steps_counting_syncs("proj-psi-lora", dict(lr=0.1), 1, inject=inject)


def test_loko_scalar_step_makes_no_blocking_host_read():
    """LoKO with the scalar (loss) observation: its skip flag goes through the deferred counter, so no step reads a
    device value on the host.  (Not checked here: one host-to-device copy of a Python scalar per step,
    ``torch.as_tensor(p_floor, device=...)`` in ``functional/ekf.py``'s scalar update, a small non-waiting copy.)"""
    model = _tower(torch.float32)
    opt = loraopt.create_optimizer("loko", model, num_outputs=None, observation="loss", lr=1e-3)
    opt.read_cpu_counts_at_once = False
    opt.skip_check_interval = 4
    hits = collections.Counter()
    for t in range(8):
        x, y = _batch(16, 100 + t)
        opt.zero_grad()
        feed(opt, None, None, loss=nn.functional.cross_entropy(model(x), y))  # observe(loss) + backward
        if t < 2:
            opt.step()
            continue
        counter = SyncCounter(_host_counters(opt))
        with counter:
            opt.step()
        counter.hits.pop("lift_fresh", None)
        hits.update(counter.hits)
    assert not hits, (dict(hits), counter.where)


# ------------------------------------------------------------------------------------------------ deferred counters


def test_skips_on_the_device_path_are_counted_and_warned_late():
    """A skipped step on the accelerator path: ``skipped_steps`` has it at once (that read waits for the device), the
    warning comes at the first step after the next non-blocking counter read has landed, and nothing changed."""
    model = _tower(torch.float32)
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=1, momentum=0.9)
    opt.read_cpu_counts_at_once = False
    opt.skip_check_interval = 4
    _train(model, opt, steps=1)
    caught_at = []
    for t in range(6):
        x, y = _batch(32, 200 + t)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        (loss * float("nan") if t == 0 else loss).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        if any("skipped 1 step" in str(w.message) for w in caught):
            caught_at.append(t)
        if t == 0:
            for n, p in model.named_parameters():
                assert torch.equal(p, before[n]), n
    # The warm-up step was the counter's 1st call, t = 0 (the skip) its 2nd; the 4th (t = 2) starts the
    # non-blocking read, which on the CPU lands at once; on a GPU the warning comes at the first call after it lands.
    assert caught_at == [2]
    assert opt.skipped_steps == 1


# ------------------------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize("name,kwargs", [
    ("psi-lora", dict(lr=0.1, inner_iters=1, momentum=0.9, dense="never", normalize=None)),
    ("proj-psi-lora", dict(lr=0.1, dense="never", normalize=None)),
    ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, inner_iters=1, dense="never", normalize=None)),
    ("proj-psi-lora", dict(lr=0.1, normalize=None)),
    ("proj-psi-lora", dict(lr=1e-3, normalize="layer", max_grad_norm=0.0)),  # the normalised step
    ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, normalize=None, max_grad_norm=1.0)),  # the plain step
    ("scaled-psi-lora", dict(lr=1e-3, other_lr=1e-2)),  # the defaults: the factored step
])
def test_every_variant_and_gradient_form_is_bucketed_by_shape(name, kwargs):
    """Rows (when the layers saw as many rows), dense gradients and streamed projections: the three 16 x 16 blocks
    are one batched call for PSI-LoRA, Proj. PSI-LoRA and Scaled PSI-LoRA, and the result equals the per-layer
    reference in float64."""
    fast_model, ref_model = _tower(torch.float64), _tower(torch.float64)
    fast = loraopt.create_optimizer(name, fast_model, **kwargs)
    ref = loraopt.create_optimizer(name, ref_model, foreach=False, **kwargs)
    calls = []
    original = fast._lora_step_batched

    def spy(group, items, reduced, clip):
        calls.append(len(items))
        return original(group, items, reduced, clip)

    fast._lora_step_batched = spy
    _train(fast_model, fast, steps=3, dtype=torch.float64)
    _train(ref_model, ref, steps=3, dtype=torch.float64)
    assert sorted(calls[-2:]) == [1, 3]
    for (n, a), (_, b) in zip(fast_model.named_parameters(), ref_model.named_parameters()):
        assert _rel(a.detach(), b.detach()) < 1e-8, n
    sa, sb = _state_tensors(fast), _state_tensors(ref)
    for k in sa:
        if sa[k].is_floating_point():
            # Proj. PSI-LoRA's transport solves amplify the summation-order differences of batched products to ~1e-8.
            assert _rel(sa[k], sb[k]) < 1e-6, k


def test_balance_many_equals_balancing_each_pair():
    """One batched SVD for several buckets (different d_out, d_in; one with k > m, norm-balanced) gives what balancing
    each pair on its own gives, bit for bit on the CPU, and keeps every product."""
    g = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(3, 20, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, 30, generator=g, dtype=torch.float64)),
        (torch.randn(2, 10, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 12, generator=g, dtype=torch.float64)),
        (torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 12, generator=g, dtype=torch.float64)),
        (torch.zeros(1, 10, 4, dtype=torch.float64), torch.randn(1, 4, 12, generator=g, dtype=torch.float64)),
    ]
    many = balance_many(pairs)
    for (B, A), (b, a) in zip(pairs, many):
        rb, ra = balance_svd(B, A)
        assert torch.equal(rb, b) and torch.equal(ra, a)
        assert torch.allclose(b @ a, B @ A, atol=1e-12)


# ------------------------------------------------------------------------------------------------ compile


def test_compile_auto_is_eager_on_the_cpu_and_validated():
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True
    with pytest.raises(ValueError, match="compile"):
        resolve_compile("yes", torch.device("cpu"))
    opt = loraopt.create_optimizer("psi-lora", _tower(), normalize=None, lr=0.1)
    assert opt._step_fn is psi_step
    with pytest.raises(ValueError, match="compile"):
        loraopt.create_optimizer("psi-lora", _tower(), normalize=None, lr=0.1, compile="sometimes")


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    """A compiler that raises: one warning, then the eager step (the failing call is repeated eagerly); results
    equal the eager optimizer's."""

    def broken(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    kwargs = dict(lr=0.1, inner_iters=1, momentum=0.9)
    models = [_tower(torch.float64), _tower(torch.float64)]
    compiled = loraopt.create_optimizer("psi-lora", models[0], normalize=None, compile=True, **kwargs)
    eager = loraopt.create_optimizer("psi-lora", models[1], normalize=None, compile=False, **kwargs)
    assert isinstance(compiled._step_fn, CompiledPSIStep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(models[0], compiled, steps=3, dtype=torch.float64)
    messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert len(messages) == 1 and "no compiler here" in messages[0]
    assert compiled._step_fn.disabled
    _train(models[1], eager, steps=3, dtype=torch.float64)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def _cxx() -> str:
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), "")


@pytest.mark.slow  # 30-60 s per case on two CPU cores (inductor compiles a C++ kernel per bucket shape)
@pytest.mark.skipif(not _cxx(), reason="torch.compile on the CPU needs a C++ compiler (g++, c++ or clang++): none found")
@pytest.mark.parametrize("name,kwargs", [
    ("psi-lora", dict(lr=0.1, inner_iters=1, momentum=0.9, max_grad_norm=0.5)),
    ("proj-psi-lora", dict(lr=0.1, normalize=None)),
    ("proj-psi-lora", dict(lr=1e-3, normalize="layer", max_grad_norm=0.0)),  # the normalised step
    ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2)),
])
def test_compiled_step_equals_eager_in_float64(name, kwargs):
    models = [_tower(torch.float64), _tower(torch.float64)]
    compiled = loraopt.create_optimizer(name, models[0], compile=True, **kwargs)
    eager = loraopt.create_optimizer(name, models[1], compile=False, **kwargs)
    _train(models[0], compiled, steps=3, dtype=torch.float64)
    _train(models[1], eager, steps=3, dtype=torch.float64)
    assert not compiled._step_fn.disabled
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert _rel(a.detach(), b.detach()) < 1e-12, n


# ------------------------------------------------------------------------------------------------ cost benchmark


def test_cost_levers_quick_writes_rows_and_ratios(tmp_path):
    """``python -m loraopt_bench.cost levers --quick``: one JSON row per (config, optimizer) with the fields the
    issue asks for, fused AdamW among them, and a markdown table of ratios beside it."""
    import json

    from loraopt_bench import cost

    cost.main(["levers", "--quick", "--compare-eager", "--out", str(tmp_path),
               "--optimizers", "adamw-fused,psi-k1,loko-scalar"])
    data = json.loads((tmp_path / "cpu.json").read_text())
    rows = {(r["config"], r["optimizer"]): r for r in data["runs"]}
    assert set(rows) == {("quick-r8-s64", n) for n in
                         ("adamw-fused", "psi-k1", "loko-scalar", "psi-k1:per-layer")}
    for r in rows.values():
        assert "error" not in r, r
        for key in ("config", "optimizer", "e2e_ms", "step_ms", "peak_bytes", "state_bytes_per_param"):
            assert key in r, (key, r)
    # The batched step dispatches far fewer operators than the per-layer path.
    assert rows[("quick-r8-s64", "psi-k1")]["dispatched_ops_per_step"] < \
        rows[("quick-r8-s64", "psi-k1:per-layer")]["dispatched_ops_per_step"] / 2
    md = (tmp_path / "cpu.md").read_text()
    assert "x AdamW" in md and "| quick-r8-s64 | adamw-fused |" in md


def test_cost_levers_full_second_moment_row_counts_its_dense_state(tmp_path):
    """The ``proj-psi-full`` row (``normalize="full"``) keeps ``d_out x d_in`` second moments per adapted layer: at
    r = 8 on layers at least 64 wide that is at least 4 x 64 x 64 / (8 x 128) = 16 more bytes per trainable
    parameter than the factored default's ``d_out + d_in``."""
    import json

    from loraopt_bench import cost

    cost.main(["levers", "--quick", "--out", str(tmp_path), "--optimizers", "adamw-fused,proj-psi,proj-psi-full"])
    rows = {r["optimizer"]: r for r in json.loads((tmp_path / "cpu.json").read_text())["runs"]}
    assert "error" not in rows["proj-psi-full"], rows["proj-psi-full"]
    assert rows["proj-psi-full"]["state_bytes_per_param"] >= rows["proj-psi"]["state_bytes_per_param"] + 16


def test_cost_run_refuses_a_lever_row_name_instead_of_skipping_it(tmp_path):
    """``cost run`` knows the library-default rows only; a lever name (``-graph``, ``-polar``) used to be skipped
    without a word, which wasted a GPU call."""
    from loraopt_bench import cost

    with pytest.raises(SystemExit, match="psi-k1-graph.*cost levers"):
        cost.main(["run", "--smoke", "--out", str(tmp_path), "--optimizers", "adamw-fused,psi-k1-graph"])


def test_gram_probe_variants_agree_with_float64_and_report_unsupported(tmp_path):
    """``python -m loraopt_bench.gram_probe``: every G_m product variant it times is checked against float64 of the
    same bf16-valued rows; variants the device lacks (bf16 out_dtype on the CPU) are reported, not timed."""
    import json

    from loraopt_bench import gram_probe

    res = gram_probe.main(["--rows", "64", "--reps", "1", "--split", "4", "--device", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gram_probe.json").read_text())
    assert saved["rows"] == 64 and set(saved["variants"]) == set(res["variants"])
    timed = {k: v for k, v in res["variants"].items() if not v.get("unsupported")}
    assert {"fp32", "tf32", "tf32-splitK4"} <= set(timed)
    for name, row in timed.items():
        assert row["rel_max_err"] < 1e-5, name
        assert set(row["per_layer_ms"]) == {n for n, _, _ in gram_probe.SMOL_BLOCK}
        assert row["step_ms"] == pytest.approx(row["block_ms"] * 30)
