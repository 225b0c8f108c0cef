"""The optimizer table that drives the conformance matrix (one row per optimizer configuration).

``train_step(case, model, optimizer, x, y, accumulate)`` is how a trainer drives each optimizer: the gradient-based
ones need a backward, LoKO needs the outputs (``observe``) instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch

import loraopt
from torch import nn

from loraopt_bench.common import GRADIENT, feed, learning_signal
from toys import loss_fn


@dataclass(frozen=True)
class Case:
    id: str
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    structured: bool = False  # needs the LoRA layer structure (rejects DoRA, embedding and k x k conv adapters)
    streams: bool = False  # K = 0 streaming capture: clipping under accumulation is a bound, not exact
    observes_outputs: bool = False  # LoKO: driven by observe(logits, targets), not by backward
    # PEFT's Riemannian preconditioner only knows 2-D factors and raises on a model whose LoRA is all conv.
    kinds: tuple = ("mlp", "conv", "gpt2")
    observes_loss: bool = False  # LoKO-scalar: backward as usual, plus observe(loss)

    def build(self, model, **overrides):
        return loraopt.create_optimizer(self.name, model, **{**self.kwargs, **overrides})


CASES = [
    Case("adamw", "adamw", dict(lr=1e-2)),
    Case("sgd-momentum", "sgd", dict(lr=0.05, momentum=0.9)),
    Case("adagrad", "adagrad", dict(lr=0.05)),
    Case("lora-plus", "lora-plus", dict(lr=2e-3)),
    Case("riemannian-sgd", "riemannian-sgd", dict(lr=0.05), kinds=("mlp", "gpt2")),
    Case("riemannian-adamw", "riemannian-adamw", dict(lr=2e-3), kinds=("mlp", "gpt2")),
    Case("psi-k1-momentum", "psi-lora", dict(normalize=None, lr=0.1, inner_iters=1, momentum=0.9), structured=True),
    Case("psi-k0-stream", "psi-lora", dict(normalize=None, lr=0.1, inner_iters=0, momentum=0.9), structured=True, streams=True),
    Case("psi-k2-clip", "psi-lora", dict(normalize=None, lr=0.1, inner_iters=2, max_grad_norm=0.5, weight_decay=0.01, momentum=0.0,
                                         other_optimizer="sgd"), structured=True),
    # The plain step (the factory's default is the factored one, case scaled-k0-factored).
    Case("scaled-k0-kfac", "scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, normalize=None, max_grad_norm=1.0),
         structured=True, streams=True),
    Case("scaled-k0-factored", "scaled-psi-lora", dict(lr=1e-3, other_lr=1e-2), structured=True),
    Case(
        "scaled-k1-shampoo", "scaled-psi-lora",
        dict(lr=0.1, other_lr=1e-2, inner_iters=1, metric="shampoo", power=0.25, normalize=None, max_grad_norm=1.0),
        structured=True,
    ),
    Case("psi-k1-normalized", "psi-lora", dict(lr=0.01, inner_iters=1, momentum=0.9, normalize="layer"),
         structured=True),
    Case("proj-psi-k1-factored", "proj-psi-lora", dict(lr=3e-3, inner_iters=1, momentum=0.9, normalize="factored",
                                                      max_grad_norm=0.0), structured=True),
    Case("proj-psi-k1-full", "proj-psi-lora", dict(lr=3e-3, inner_iters=1, momentum=0.9, normalize="full",
                                                  max_grad_norm=0.0), structured=True),
    Case("proj-psi-k1-momentum", "proj-psi-lora", dict(normalize=None, lr=0.1, inner_iters=1, momentum=0.9), structured=True),
    Case("proj-psi-k0-clip", "proj-psi-lora", dict(normalize=None, lr=0.1, inner_iters=0, momentum=0.9, max_grad_norm=0.5,
                                                    other_optimizer="adam", other_lr=1e-2), structured=True),
    Case("svdlora-momentum", "svdlora", dict(lr=0.1, momentum=0.9), structured=True),
]

try:  # LoKO lives in its own module; the matrix includes it when present.
    import loraopt.optim.loko  # noqa: F401

    CASES += [
        Case("loko-softmax", "loko", dict(num_outputs=3), observes_outputs=True),
        Case("loko-loss", "loko", dict(num_outputs=3, observation="loss"), observes_loss=True),
    ]
except ImportError:  # pragma: no cover
    pass

CASE_IDS = [c.id for c in CASES]


def train_step(case: Case, model, optimizer, x, y, accumulate: int = 1):
    """One optimizer step on (x, y), split into ``accumulate`` micro-batches for gradient-based optimizers; how each
    optimizer is fed (backward, observe(outputs, y), observe(loss) + backward) is loraopt_bench's ``feed``."""
    optimizer.zero_grad()
    chunks = accumulate if learning_signal(optimizer) == GRADIENT else 1
    for xm, ym in zip(x.chunk(chunks), y.chunk(chunks)):
        feed(optimizer, model(xm), ym, lambda out, target: nn.functional.cross_entropy(out, target) / chunks)
    optimizer.step()


def evaluate(model, x, y) -> float:
    with torch.no_grad():
        return loss_fn(model, x, y).item()


# ------------------------------------------------------------------------------------------------- error inputs
#
# Bad and edge inputs, as rows run over every case where they apply (torch.optim's ``optim_error_inputs_func``
# idea).  ``stage`` says where the input enters: "construct" (factory arguments or the model), "load"
# (``load_state_dict``) or "step" (what a training loop does before / at ``step()``).  ``expect`` is the outcome the
# test checks:
#
# * "raise": ``error`` is raised, its message matches ``match`` (the problem and the fix), and parameters and
#   optimizer state are unchanged (the optimizer still trains afterwards);
# * "skip": no error; parameters and state unchanged, ``optimizer.skipped_steps`` counts it, a RuntimeWarning says so,
#   and the next good step trains normally (one bad batch does not poison the state);
# * "unchanged": no error and nothing changes (documented no-op);
# * "ok": no error (documented behaviour, ``note`` says which); parameters stay finite and training continues.
#
# ``xfail`` holds the reason a row does not hold yet for a case (strict: the row flips when fixed).

NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class ErrorInput:
    id: str
    stage: str
    make: Any  # construct: (case) -> optimizer; load: (case, opt, model) -> state_dict; step: (case, model, opt) -> None
    expect: str = "raise"
    error: Any = ValueError
    match: str = ""
    note: str = ""
    xfail: str = ""
    setup: Any = None  # step: (case, model, opt) -> None, run before the snapshot the outcome is compared with


def _hp(case: Case) -> set:
    from loraopt.optim.registry import optimizer_hyperparameters

    return set(optimizer_hyperparameters(case.name))


def _with(case: Case, **overrides):
    from toys import make_model

    return lambda c: c.build(make_model(), **overrides)


GRADIENT_BASED = ("adamw", "sgd", "adagrad", "lora-plus", "riemannian-sgd", "riemannian-adamw")
OURS = ("psi-lora", "scaled-psi-lora", "proj-psi-lora", "svdlora", "loko")
PSI = ("psi-lora", "scaled-psi-lora", "proj-psi-lora")


def _construct_rows(case: Case) -> List[ErrorInput]:
    accepted = _hp(case)
    rows = []

    def bad(rid, key, value, match=None, error=ValueError, xfail=""):
        if key in accepted:
            rows.append(ErrorInput(rid, "construct", _with(case, **{key: value}), error=error,
                                   match=match or key, xfail=xfail))

    for key in ("lr", "other_lr"):
        bad(f"{key}-nan", key, NAN)
        bad(f"{key}-negative", key, -1.0)
        bad(f"{key}-inf", key, INF)
    bad("lr-string", "lr", "0.1")
    bad("lr-none", "lr", None)
    bad("weight_decay-negative", "weight_decay", -0.1)
    bad("weight_decay-nan", "weight_decay", NAN)
    bad("momentum-negative", "momentum", -0.1)
    bad("momentum-above-1", "momentum", 1.5)
    bad("momentum-nan", "momentum", NAN)
    bad("betas-beta1-is-1", "betas", (1.0, 0.999))
    bad("betas-one-value", "betas", (0.9,))
    bad("betas-nan", "betas", (NAN, 0.999))
    bad("betas-string", "betas", "0.9")
    bad("eps-negative", "eps", -1e-8)
    bad("eps-nan", "eps", NAN)
    specific = {
        "psi-lora": [("inner_iters-negative", "inner_iters", -1), ("inner_iters-float", "inner_iters", 1.5),
                     ("lmbd-negative", "lmbd", -1.0), ("rank_mult-zero", "rank_mult", 0.0),
                     ("max_grad_norm-nan", "max_grad_norm", NAN), ("dampening-above-1", "dampening", 1.5),
                     ("capture-unknown", "capture", "bogus"), ("jitter-negative", "jitter", -1.0)],
        "scaled-psi-lora": [("metric-unknown", "metric", "bogus"), ("power-above-1", "power", 2.0),
                            ("damping-zero", "damping", 0.0), ("loss_reduction-unknown", "loss_reduction", "bogus"),
                            ("adam_betas-beta1-is-1", "adam_betas", (1.0, 0.9)), ("adam_eps-zero", "adam_eps", 0.0),
                            ("other_weight_decay-negative", "other_weight_decay", -1.0)],
        "svdlora": [("base-unknown", "base", "lion"), ("compute_dtype-int", "compute_dtype", torch.int64),
                    ("eps-zero", "eps", 0.0)],
        "loko": [("num_outputs-zero", "num_outputs", 0), ("num_outputs-none", "num_outputs", None),
                 ("num_outputs-string", "num_outputs", "3"), ("observation-unknown", "observation", "bogus"),
                 ("beta-above-1", "beta", 1.5), ("r0-zero", "r0", 0.0), ("r_min-negative", "r_min", -1.0),
                 ("q-negative", "q", -1.0), ("p_init-low-above-high", "p_init", (1.0, 0.1)),
                 ("batch_mode-unknown", "batch_mode", "bogus"), ("jitter-nan", "jitter", NAN),
                 ("dtype-fp16", "dtype", torch.float16), ("seed-negative", "seed", -1)],
        "lora-plus": [("loraplus_lr_ratio-zero", "loraplus_lr_ratio", 0.0),
                      ("loraplus_lr_ratio-nan", "loraplus_lr_ratio", NAN),
                      ("optimizer_cls-unknown", "optimizer_cls", "lion"),
                      ("optimizer_cls-not-an-optimizer", "optimizer_cls", int)],
        "riemannian-sgd": [("reg-negative", "reg", -1.0), ("reg-nan", "reg", NAN)],
        "riemannian-adamw": [("reg-negative", "reg", -1.0), ("reg-nan", "reg", NAN)],
        "adagrad": [("initial_accumulator_value-negative", "initial_accumulator_value", -1.0)],
        "sgd": [("nesterov-without-momentum", "nesterov", True)],
    }
    for rid, key, value in specific.get(case.name, []):
        if case.name == "loko" and case.kwargs.get("observation") == "loss" and key == "num_outputs":
            continue  # ignored by the scalar-loss observation
        if case.name == "sgd" and key == "nesterov":
            rows.append(ErrorInput(rid, "construct", _with(case, nesterov=True, momentum=0.0), match="nesterov"))
            continue
        error = TypeError if key == "optimizer_cls" and value is int else ValueError
        bad(rid, key, value, error=error)

    rows.append(ErrorInput("unknown-hyperparameter", "construct", _with(case, bogus=1), match="does not take bogus"))
    rows.append(ErrorInput("model-none", "construct", lambda c: c.build(None), error=TypeError, match="nn.Module"))
    rows.append(ErrorInput("model-parameters-iterator", "construct", lambda c: c.build(_model().parameters()),
                           error=TypeError, match="nn.Module"))
    rows.append(ErrorInput("frozen-model", "construct", lambda c: c.build(_frozen_model()),
                           match="no trainable parameter"))
    if case.name in ("adamw", "sgd", "adagrad"):
        rows.append(ErrorInput("no-lora-layers", "construct", lambda c: c.build(_plain_model()), expect="ok",
                               note="the plain baselines train any trainable parameters"))
        rows.append(ErrorInput("rank-0-layer", "construct", lambda c: c.build(_rank0_model()), expect="ok",
                               note="empty factors: nothing to update, the rest trains"))
    else:
        rows.append(ErrorInput("no-lora-layers", "construct", lambda c: c.build(_plain_model()),
                               match="(?i)no (trainable )?LoRA"))
        rows.append(ErrorInput("rank-0-layer", "construct", lambda c: c.build(_rank0_model()), match="rank 0"))
    rows.append(_added_factor_row(case))
    return rows


def _add_lora_factors_later(case: Case):
    """Build the optimizer while fc2's LoRA factors are frozen, then unfreeze them and add them as a group."""
    model = _model()
    factors = [(n, p) for n, p in model.named_parameters() if "fc2.lora_" in n]
    for _, p in factors:
        p.requires_grad_(False)
    opt = case.build(model)
    for _, p in factors:
        p.requires_grad_(True)
    opt.add_param_group({"params": factors})
    return opt


def _added_factor_row(case: Case) -> ErrorInput:
    rid = "add-param-group-lora-factors"
    if case.name in ("adamw", "sgd", "adagrad", "loko"):
        return ErrorInput(rid, "construct", _add_lora_factors_later, expect="ok",
                          note="these optimizers treat every parameter alike: added factors train like the others")
    if case.name == "lora-plus":
        return ErrorInput(rid, "construct", _add_lora_factors_later, expect="warn", error=UserWarning,
                          match="loraplus_lr_ratio")
    return ErrorInput(rid, "construct", _add_lora_factors_later, match="add_param_group")


# --- models for the error inputs


def _model(kind: str = "mlp", **kwargs):
    from toys import make_model

    return make_model(kind, **kwargs)


def _frozen_model():
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _plain_model():
    from toys import MLP

    torch.manual_seed(0)
    return MLP()


class _Adapter(torch.nn.Module):
    """A hand-made LoRA layer (``lora_A``/``lora_B`` submodules) with rank ``r``."""

    def __init__(self, d_in: int, d_out: int, r: int):
        super().__init__()
        self.base_layer = torch.nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(d_in, r, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(r, d_out, bias=False)})
        self.scaling = {"default": 1.0}

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def _rank0_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Adapter(12, 16, 0), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model


# --- load_state_dict inputs


def _trained(case: Case, steps: int = 2, **model_kwargs):
    from toys import make_batch

    model = _model(**model_kwargs)
    opt = case.build(model)
    for t in range(steps):
        train_step(case, model, opt, *make_batch("mlp", seed=10 + t))
    return model, opt


def _donor(case: Case) -> Case:
    """A case of another optimizer type whose group hyperparameters differ from ``case``'s."""
    adam_like = ("adamw", "lora-plus", "riemannian-adamw")
    return next(c for c in CASES if c.name != case.name and (c.name == "sgd" if case.name in adam_like
                                                                 else c.name == "adamw"))


def _strip_tags(sd):
    out = dict(sd)
    out["param_groups"] = [{k: v for k, v in g.items() if not k.startswith("loraopt_")} for g in sd["param_groups"]]
    return out


def _edit_state(sd, edit, want=None):
    """A copy of ``sd`` with ``edit(tensor)`` applied to the first state tensor that ``want`` selects (default: a
    floating tensor with a dimension, else any floating tensor)."""
    out = dict(sd)
    out["state"] = {pid: dict(s) for pid, s in sd["state"].items()}
    wants = [want] if want else [lambda k, v: v.is_floating_point() and v.dim() >= 1 and k != "step",
                                 lambda k, v: v.is_floating_point()]
    for w in wants:
        for pid, s in out["state"].items():
            for k, v in s.items():
                if torch.is_tensor(v) and w(k, v):
                    s[k] = edit(v.clone())
                    return out
    raise AssertionError("no state tensor to edit")


def _edit_groups(sd, edit):
    out = dict(sd)
    out["param_groups"] = [dict(g) for g in sd["param_groups"]]
    edit(out["param_groups"])
    return out


def _drop_key(opt):
    """Remove a hyperparameter the optimizer needs from every saved group."""
    required = getattr(opt, "_required_group_keys", lambda g: set(opt.defaults))(opt.param_groups[0])
    key = sorted(set(required) - {"lr"})[0]

    def edit(groups):
        for g in groups:
            g.pop(key, None)
    return edit


def _load_rows(case: Case) -> List[ErrorInput]:
    psi_shapes = ""
    shapes_xfail = ""
    rows = [
        ErrorInput("other-optimizer-type", "load", lambda c, o, m: _trained(_donor(c))[1].state_dict(),
                   match="(?i)saved by|another optimizer"),
        ErrorInput("other-optimizer-type-untagged", "load",
                   lambda c, o, m: _strip_tags(_trained(_donor(c))[1].state_dict()),
                   match="(?i)lacks|missing|parameter group"),
        ErrorInput("other-lora-ranks", "load", lambda c, o, m: _trained(c, r=2)[1].state_dict(),
                   match="(?i)shape.*(other|rank)"),
    ]
    stateless = case.name in ("sgd", "riemannian-sgd") and not case.kwargs.get("momentum")
    # PSI-LoRA without momentum (and an SGD head without momentum) keeps only scalar counters.
    no_shaped_state = (case.name == "psi-lora" and case.kwargs.get("momentum") == 0
                       and case.kwargs.get("other_optimizer") == "sgd")
    if stateless or case.name == "svdlora" or no_shaped_state:
        rows.append(ErrorInput(
            "other-lora-ranks-untagged", "load", lambda c, o, m: _strip_tags(_trained(c, r=2)[1].state_dict()),
            expect="ok", note="no state that depends on the rank (none, only counters, or SVDLoRA's dense d_out x d_in "
                              "state)"))
    else:
        rows.append(ErrorInput(
            "other-lora-ranks-untagged", "load", lambda c, o, m: _strip_tags(_trained(c, r=2)[1].state_dict()),
            match="shape", xfail=shapes_xfail))
    if not stateless:
        rows.append(ErrorInput("state-nan", "load", lambda c, o, m: _edit_state(o.state_dict(), lambda v: v.fill_(NAN)),
                               match="NaN or inf|non-finite"))
        rows.append(ErrorInput("state-inf", "load", lambda c, o, m: _edit_state(o.state_dict(), lambda v: v.fill_(INF)),
                               match="NaN or inf|non-finite"))
    if not stateless and not no_shaped_state:
        rows.append(ErrorInput(
            "state-tensor-wrong-shape", "load", lambda c, o, m: _edit_state(o.state_dict(), lambda v: v[..., :-1]),
            match="shape", xfail=shapes_xfail))
    rows += [
        ErrorInput("model-state-dict", "load", lambda c, o, m: m.state_dict(), match="(?i)optimizer.?state_dict|'state' and 'param_groups'"),
        ErrorInput("group-missing", "load", lambda c, o, m: _edit_groups(o.state_dict(), lambda g: g.pop()),
                   match="parameter group"),
        ErrorInput("group-extra", "load",
                   lambda c, o, m: _edit_groups(o.state_dict(), lambda g: g.append({**g[-1], "params": []})),
                   match="parameter group"),
        ErrorInput("hyperparameter-key-missing", "load", lambda c, o, m: _edit_groups(o.state_dict(), _drop_key(o)),
                   match="(?i)lacks|missing"),
        ErrorInput("saved-lr-nan", "load",
                   lambda c, o, m: _edit_groups(o.state_dict(), lambda g: g[0].update(lr=NAN)), match="lr"),
        ErrorInput("state-of-unknown-parameter", "load",
                   lambda c, o, m: {**o.state_dict(), "state": {**o.state_dict()["state"], 999: {}}},
                   match="999"),
        ErrorInput("untagged-own-checkpoint", "load", lambda c, o, m: _strip_tags(o.state_dict()), expect="ok",
                   note="checkpoints of earlier loraopt versions (no type tag) still load"),
    ]
    if case.name == "scaled-psi-lora":
        rows.append(ErrorInput(
            "metric-wrong-length", "load",
            lambda c, o, m: _edit_state(o.state_dict(), lambda v: v[:-1], want=lambda k, v: k == "metric_in"),
            match="shape", xfail=psi_shapes))
    if case.name == "loko":
        rows.append(ErrorInput(
            "noise-R-nan", "load",
            lambda c, o, m: _edit_state(o.state_dict(), lambda v: v.fill_(NAN), want=lambda k, v: k == "R"),
            match="NaN or inf|non-finite"))
        rows.append(ErrorInput(
            "noise-R-wrong-size", "load",
            lambda c, o, m: _edit_state(_strip_tags(o.state_dict()), lambda v: torch.eye(v.shape[-1] + 1, dtype=v.dtype),
                                        want=lambda k, v: k == "R"),
            match="shape|num_outputs"))
    return rows


def c_obs(case: Case) -> str:
    return case.kwargs.get("observation", "softmax")


# --- step-time inputs


def _poisoned_step(case: Case, model, opt, poison: str, closure: bool = False):
    """One training step whose batch, loss, outputs or gradient is made non-finite by ``poison``."""
    from toys import loss_fn, make_batch

    x, y = make_batch("mlp", seed=3)
    if poison == "input-nan":
        x = x.clone()
        x[0, 0] = NAN
    factor = {"loss-nan": NAN, "loss-inf": INF}.get(poison, 1.0)
    opt.zero_grad()
    if case.observes_outputs:
        def observed():
            out = model(x)
            return (out * factor if factor != 1.0 else out), y
        if closure:
            opt.step(observed)
        else:
            opt.observe(*observed())
            opt.step()
        return

    def backward():
        loss = loss_fn(model, x, y) * factor
        if case.observes_loss and not closure:  # LoKO-scalar observes the loss its closure returns
            opt.observe(loss)
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None and ((poison == "head-grad-nan" and "head" in name and name.endswith("weight"))
                                       or (poison == "lora-grad-nan" and "lora_A" in name)):
                p.grad[0, 0] = NAN
        return loss

    if closure:
        opt.step(backward)
    else:
        backward()
        opt.step()


def _set_lr(value):
    def act(case, model, opt):
        for g in opt.param_groups:
            g["lr"] = value
        train_step(case, model, opt, *__import__("toys").make_batch("mlp", seed=3))
    return act


def _empty_batch(case, model, opt):
    from toys import make_batch

    x, y = make_batch("mlp", seed=3)
    train_step(case, model, opt, x[:0], y[:0])


def _step_without_backward(case, model, opt):
    opt.zero_grad()
    opt.step()


def _good_step(case, model, opt):
    from toys import make_batch

    train_step(case, model, opt, *make_batch("mlp", seed=3))


def _step_twice(case, model, opt):
    opt.step()  # after _good_step (the row's setup): no new backward


def _zero_grad_before_step(case, model, opt):
    from toys import loss_fn, make_batch

    x, y = make_batch("mlp", seed=3)
    opt.zero_grad()
    if case.observes_outputs:
        opt.observe(model(x), y)
    else:
        loss = loss_fn(model, x, y)
        if case.observes_loss:
            opt.observe(loss)
        loss.backward()
    opt.zero_grad()
    opt.step()


def _add_group_bad_lr(case, model, opt):
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": NAN})


def _step_rows(case: Case) -> List[ErrorInput]:
    ours = case.name in OURS
    psi = case.name in PSI
    grads = not case.observes_outputs
    rows = []
    skip_xfail = ""
    for poison in ("loss-nan", "loss-inf", "input-nan"):
        rows.append(ErrorInput(f"{poison}", "step", lambda c, m, o, p=poison: _poisoned_step(c, m, o, p),
                               expect="skip", xfail=skip_xfail))
    rows.append(ErrorInput("loss-nan-in-closure", "step",
                           lambda c, m, o: _poisoned_step(c, m, o, "loss-nan", closure=True), expect="skip",
                           xfail=skip_xfail))
    if grads:
        rows.append(ErrorInput("head-grad-nan", "step", lambda c, m, o: _poisoned_step(c, m, o, "head-grad-nan"),
                               expect="skip", xfail=skip_xfail))
        rows.append(ErrorInput(
            "lora-grad-nan", "step", lambda c, m, o: _poisoned_step(c, m, o, "lora-grad-nan"), expect="skip",
            note="an edited .grad of a LoRA factor counts (hook-based optimizers check it too)",
            ))
    for name, value in (("lr-nan-from-scheduler", NAN), ("lr-inf-from-scheduler", INF)):
        rows.append(ErrorInput(name, "step", _set_lr(value), expect="skip_or_raise", match="lr",
                               note="a counted skip with a warning, or a clear error; nothing changes",
                               xfail=skip_xfail))
    rows.append(ErrorInput("lr-negative-from-scheduler", "step", _set_lr(-0.1), match="lr.*(< 0|>= 0)",
                           ))
    if case.name in GRADIENT_BASED:
        rows.append(ErrorInput("zero-size-batch", "step", _empty_batch, expect="ok",
                               note="an empty batch gives a zero gradient, which torch optimizers apply as usual"))
        rows.append(ErrorInput("step-without-backward", "step", _step_without_backward, expect="unchanged",
                               note="torch skips parameters without .grad"))
        rows.append(ErrorInput("step-twice", "step", _step_twice, setup=_good_step, expect="ok",
                               note="torch applies the .grad that is still there again (zero_grad clears it)"))
        rows.append(ErrorInput("zero-grad-before-step", "step", _zero_grad_before_step, expect="unchanged",
                               note="torch skips parameters without .grad"))
    else:
        rows.append(ErrorInput(
            "zero-size-batch", "step", _empty_batch, error=(ValueError, RuntimeError), match="(?i)empty",
            xfail="loko.py: refuse an empty batch (observation='loss') with a clear error (its mean loss is a "
                  "NaN like any other)" if case.observes_loss else ""))
        if psi:
            rows.append(ErrorInput("step-without-backward", "step", _step_without_backward, error=RuntimeError,
                                   match="without a preceding backward"))
        else:
            rows.append(ErrorInput("step-without-backward", "step", _step_without_backward, expect="unchanged",
                                   note="nothing observed: nothing to do"))
        if case.observes_outputs:
            rows.append(ErrorInput("step-twice", "step", _step_twice, setup=_good_step, expect="unchanged",
                                   note="the observation was consumed by the first step"))
        else:
            rows.append(ErrorInput(
                "step-twice", "step", _step_twice, setup=_good_step, error=(RuntimeError, ValueError),
                match="(?i)again|twice|already"))
        rows.append(ErrorInput("zero-grad-before-step", "step", _zero_grad_before_step,
                               error=(RuntimeError, ValueError), match="(?i)zero_grad|backward|observe",
                               expect="raise" if psi else "unchanged"))
    rows.append(ErrorInput("add-param-group-lr-nan", "step", _add_group_bad_lr, match="lr"))
    if case.name == "loko":
        rows += _loko_rows(case)
    return rows


def _loko_rows(case: Case) -> List[ErrorInput]:
    from toys import make_batch

    x, y = make_batch("mlp", seed=3)
    if c_obs(case) == "loss":
        return [ErrorInput("observe-logits-with-loss-observation", "step",
                           lambda c, m, o: o.observe(m(x), y), match="loss")]

    def soft(total):
        return torch.full((x.shape[0], 3), total / 3)

    return [
        ErrorInput("soft-targets-not-summing-to-1", "step", lambda c, m, o: (o.observe(m(x), soft(2.0)), o.step()),
                   match="sum to 1"),
        ErrorInput("observe-twice", "step", lambda c, m, o: (o.observe(m(x), y), o.observe(m(x), y)),
                   match="observe"),
        ErrorInput("logits-wrong-width", "step", lambda c, m, o: o.observe(m(x)[:, :2], y), match="2|3"),
        ErrorInput("detached-logits", "step", lambda c, m, o: o.observe(m(x).detach(), y), match="(?i)graph|detach"),
        ErrorInput("target-out-of-range", "step", lambda c, m, o: o.observe(m(x), torch.full_like(y, 7)),
                   match=r"\[0, 3\)"),
        ErrorInput("targets-wrong-count", "step", lambda c, m, o: o.observe(m(x), y[:-1]), match="target"),
        ErrorInput("closure-returns-loss", "step",
                   lambda c, m, o: o.step(lambda: torch.nn.functional.cross_entropy(m(x), y)), match="closure"),
    ]


def error_inputs(case: Case) -> List[ErrorInput]:
    """Every bad / edge input row that applies to ``case``."""
    return _construct_rows(case) + _load_rows(case) + _step_rows(case)
