"""Fast paths equal their reference paths (specs/integration.md §1: a batched path is tested equal to the per-layer
reference in float64).

* LoRSum over a batch of layers (leading dimension L) == one call per layer; a dense gradient term ``(c, G, None)``
  == the row term ``(c, S^T, X)`` it came from.
* The capture's dense representation of G (``dense="auto"``) == the rows it replaces, including the switch from
  rows to dense in the middle of gradient accumulation, and the stream projections / norm / Shampoo statistics
  computed from the dense micro-batch gradient == those computed from the rows.
* PSI-LoRA and Scaled PSI-LoRA with the batched step and dense capture (the defaults) == the per-layer reference
  loop with row capture (``foreach=False, dense="never"``), over several steps, in float64 and in float32.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import loraopt
from loraopt.functional import lorsum, lorsum_from_projections, spd_solve
from loraopt.lora.capture import GradientCapture, _sixteen_bit_rows, _TF32
from loraopt.lora.layers import find_lora_layers

F64 = torch.float64


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------ functional


def _layers(L=4, d_out=20, d_in=14, r=3, n=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    B0 = torch.randn(L, d_out, r, generator=g, dtype=F64)
    A0 = torch.randn(L, r, d_in, generator=g, dtype=F64)
    S = 0.1 * torch.randn(L, n, d_out, generator=g, dtype=F64)
    X = torch.randn(L, n, d_in, generator=g, dtype=F64)
    MB = torch.randn(L, d_out, 2, generator=g, dtype=F64)
    MA = torch.randn(L, 2, d_in, generator=g, dtype=F64)
    p_in = torch.rand(L, d_in, generator=g, dtype=F64) + 0.5
    p_out = torch.rand(L, d_out, generator=g, dtype=F64) + 0.5
    return B0, A0, S, X, MB, MA, p_in, p_out


@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize("scaled", [False, True])
def test_batched_lorsum_equals_per_layer_calls(iters, scaled):
    B0, A0, S, X, MB, MA, p_in, p_out = _layers()
    kw = dict(iters=iters, lam=0.05, jitter=1e-6, compute_dtype=F64)
    pin, pout = (p_in, p_out) if scaled else (None, None)
    batched = lorsum((0.97, B0, A0), [(-0.3, S.mT, X), (-0.2, MB, MA)], p_in=pin, p_out=pout, **kw)
    for i in range(B0.shape[0]):
        one = lorsum(
            (0.97, B0[i], A0[i]), [(-0.3, S[i].mT, X[i]), (-0.2, MB[i], MA[i])],
            p_in=None if pin is None else pin[i], p_out=None if pout is None else pout[i], **kw,
        )
        assert _rel(batched.A[i], one.A) < 1e-13 and _rel(batched.B[i], one.B) < 1e-13
        assert batched.fallbacks[i].item() == one.fallbacks.item() == 0


@pytest.mark.parametrize("iters", [0, 2])
def test_dense_gradient_term_equals_its_rows(iters):
    B0, A0, S, X, MB, MA, p_in, p_out = _layers(L=1)
    B0, A0, S, X, MB, MA, p_in, p_out = (t[0] for t in (B0, A0, S, X, MB, MA, p_in, p_out))
    kw = dict(iters=iters, lam=0.02, jitter=1e-6, compute_dtype=F64, p_in=p_in, p_out=p_out)
    rows = lorsum((1.0, B0, A0), [(-0.5, S.mT, X, True), (0.1, MB, MA)], **kw)
    dense = lorsum((1.0, B0, A0), [(-0.5, S.mT @ X, None, True), (0.1, MB, MA)], **kw)
    assert _rel(dense.A, rows.A) < 1e-13 and _rel(dense.B, rows.B) < 1e-13


def test_batched_projections_round_equals_per_layer():
    B0, A0, S, X, MB, MA, p_in, p_out = _layers()
    G = S.mT @ X
    BtD, DAt = -0.4 * B0.mT @ G, -0.4 * G @ A0.mT
    batched = lorsum_from_projections((0.9, B0, A0), BtD, DAt, lam=0.01, p_in=p_in, p_out=p_out, compute_dtype=F64)
    for i in range(B0.shape[0]):
        one = lorsum_from_projections(
            (0.9, B0[i], A0[i]), BtD[i], DAt[i], lam=0.01, p_in=p_in[i], p_out=p_out[i], compute_dtype=F64
        )
        assert _rel(batched.A[i], one.A) < 1e-13 and _rel(batched.B[i], one.B) < 1e-13


def test_batched_spd_solve_flags_each_system():
    good = torch.eye(3, dtype=F64) * 2
    bad = -torch.eye(3, dtype=F64)  # Cholesky fails, LU does not
    gram = torch.stack([good, bad, good])
    rhs = torch.randn(3, 3, 2, dtype=F64)
    x, failed = spd_solve(gram, rhs, jitter=0.0)
    assert failed.tolist() == [0, 1, 0]
    for i in range(3):
        xi, fi = spd_solve(gram[i], rhs[i], jitter=0.0)
        assert torch.allclose(x[i], xi) and fi.item() == failed[i].item()
        assert torch.allclose(gram[i] @ x[i], rhs[i])


# ------------------------------------------------------------------------------------------------ models


class Tower(nn.Module):
    """Several layers of one shape (what the batched step stacks) plus one of another shape."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h)


def _tower(dtype=torch.float32, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["inp", "blocks.0", "blocks.1", "blocks.2"], lora_dropout=dropout,
        modules_to_save=["head"], alpha_pattern={"blocks.1": 2},  # one block with its own scaling
    )
    model = get_peft_model(Tower(), cfg).to(dtype)
    for n, p in model.named_parameters():  # B != 0, so every term of the update is exercised
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.1)
    return model


def _batch(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def _train(model, opt, steps=3, n=32, accumulate=1, dtype=torch.float32):
    for t in range(steps):
        x, y = _batch(n, 100 + t, dtype)
        opt.zero_grad()
        for xm, ym in zip(x.chunk(accumulate), y.chunk(accumulate)):
            (nn.functional.cross_entropy(model(xm), ym) / accumulate).backward()
        opt.step()


CONFIGS = [
    ("psi-lora", dict(lr=0.1, inner_iters=0, momentum=0.9, normalize=None)),
    ("psi-lora", dict(lr=0.1, inner_iters=1, momentum=0.9, normalize=None)),
    ("psi-lora", dict(lr=0.1, inner_iters=2, max_grad_norm=0.5, weight_decay=0.01, normalize=None)),
    ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2)),  # K = 0, K-FAC, clipping at 1.0 (defaults)
    ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, inner_iters=1, metric="shampoo", power=0.25, max_grad_norm=0.1)),
    ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, metric="shampoo", max_grad_norm=0.1)),
]


def _state_tensors(opt):
    out = {}
    for i, (p, st) in enumerate(opt.state.items()):
        for k, v in st.items():
            if torch.is_tensor(v):
                out[(i, k)] = v
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("accumulate", [1, 4])
@pytest.mark.parametrize("config", range(len(CONFIGS)), ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_batched_dense_step_equals_per_layer_reference(config, accumulate, dtype):
    name, kwargs = CONFIGS[config]
    fast_model, ref_model = _tower(dtype), _tower(dtype)
    fast = loraopt.create_optimizer(name, fast_model, **kwargs)
    ref = loraopt.create_optimizer(name, ref_model, foreach=False, dense="never", **kwargs)
    _train(fast_model, fast, accumulate=accumulate, dtype=dtype)
    _train(ref_model, ref, accumulate=accumulate, dtype=dtype)
    # The optimizers compute in fp32 whatever the parameter dtype: the two paths differ by summation order only.
    tol = 2e-5
    for (n, a), (_, b) in zip(fast_model.named_parameters(), ref_model.named_parameters()):
        assert _rel(a.detach().double(), b.detach().double()) < tol, n
    sa, sb = _state_tensors(fast), _state_tensors(ref)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        if sa[k].is_floating_point():
            assert _rel(sa[k].double(), sb[k].double()) < tol, k
        else:
            assert torch.equal(sa[k], sb[k]), k


def test_batched_step_uses_few_launches_per_shape():
    """The batched step runs one LoRSum per shape: the three same-shape blocks are updated by one stack."""
    model = _tower()
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=1)
    calls = []
    original = opt._lora_step_batched

    def spy(group, items, reduced, clip):
        calls.append(len(items))
        return original(group, items, reduced, clip)

    opt._lora_step_batched = spy
    _train(model, opt, steps=1)
    assert sorted(calls) == [1, 3]


# ------------------------------------------------------------------------------------------------ capture


def _capture(model, batches, **kw):
    layers = find_lora_layers(model)
    cap = GradientCapture(layers, **kw)
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
    cap.remove()
    return layers, cap


def _G(obs):
    if obs.G is not None:
        return obs.G.double()
    # From the raw rows in float64 (``rows()`` hands S out in fp32, the optimizer's compute dtype).
    x, g = torch.cat(obs.x_rows).double(), torch.cat(obs.g_rows).double()
    return (g / obs.scaling).mT @ x


@pytest.mark.parametrize("sizes", [(32,), (4, 16, 12)], ids=["one", "rows-then-dense"])
def test_dense_capture_holds_the_same_gradient_as_rows(sizes):
    model = _tower(torch.float64)
    batches = [_batch(n, i, torch.float64) for i, n in enumerate(sizes)]
    layers, rows = _capture(model, batches, mode="rows", kfac_stats=True, shampoo_stats=True)
    _, dense = _capture(model, batches, mode="rows", kfac_stats=True, shampoo_stats=True, dense="auto")
    for layer in layers:
        a, b = rows.observation(layer), dense.observation(layer)
        assert b.G is not None and not b.x_rows, "dense wins here: d_in d_out <= N (d_in + d_out)"
        assert a.n_rows == b.n_rows == sum(sizes)
        assert _rel(_G(b), _G(a)) < 1e-12
        # The row forms hand S and the statistics out in fp32 (the optimizer's compute dtype): fp32 agreement.
        assert abs(b.grad_sq_norm().item() - a.grad_sq_norm().item()) <= 1e-6 * a.grad_sq_norm().item()
        for key in ("x_sq", "s_sq", "shampoo_in", "shampoo_out"):
            assert _rel(getattr(b, key).double(), getattr(a, key).double()) < 1e-6, key


def test_small_batches_keep_rows():
    model = _tower(torch.float64)
    layers, cap = _capture(model, [_batch(2, 0, torch.float64)], mode="rows", dense="auto")
    assert all(cap.observation(layer).x_rows and cap.observation(layer).G is None for layer in layers)


@pytest.mark.parametrize("sizes", [(32,), (16, 16)])
def test_dense_stream_projections_equal_row_projections(sizes):
    model = _tower(torch.float64)
    layers = find_lora_layers(model)
    probes = lambda layer: (  # noqa: E731
        torch.cat([layer.b_matrix(F64), torch.ones(layer.d_out, 2, dtype=F64)], 1),
        torch.cat([layer.a_matrix(F64).mT, torch.ones(layer.d_in, 2, dtype=F64)], 1),
    )
    batches = [_batch(n, i, torch.float64) for i, n in enumerate(sizes)]
    kw = dict(mode="stream", probes=probes, kfac_stats=True, shampoo_stats=True, grad_norm=True)
    _, rows = _capture(model, batches, **kw)
    _, dense = _capture(model, batches, dense="auto", **kw)
    for layer in layers:
        a, b = rows.observation(layer), dense.observation(layer)
        for key in ("left", "right", "grad_norm_bound"):  # in the probes' dtype (float64 here)
            assert _rel(getattr(b, key), getattr(a, key)) < 1e-11, key
        for key in ("x_sq", "s_sq", "shampoo_in", "shampoo_out"):  # statistics: fp32 in the row forms
            assert _rel(getattr(b, key).double(), getattr(a, key).double()) < 1e-6, key


def test_sixteen_bit_rows_detection():
    for dtype, dropout, expected in ((torch.bfloat16, 0.0, True), (torch.bfloat16, 0.1, False),
                                     (torch.float32, 0.0, False)):
        model = _tower(dropout=dropout)
        for layer in find_lora_layers(model):
            layer.module.base_layer.to(dtype)
            assert _sixteen_bit_rows(layer) is expected


def test_tf32_block_restores_the_flag():
    before = torch.backends.cuda.matmul.allow_tf32
    with _TF32():
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
