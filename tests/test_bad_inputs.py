"""The bad-input suite: every row of ``optim_cases.error_inputs`` run over every optimizer case it applies to.

Each row either raises a clear error (the problem and the fix in the message) and leaves the parameters and the
optimizer state as they were, or has a documented behaviour (a counted skip, a no-op, torch's semantics); see the
outcome kinds in ``optim_cases.py``.  Rows that wait on a fix elsewhere are strict xfails naming what is needed.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from optim_cases import CASES, error_inputs, train_step
from toys import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [(case, row) for case in CASES for row in error_inputs(case)]


def _param(case, row, stage):
    marks = [pytest.mark.xfail(strict=True, reason=row.xfail)] if row.xfail else []
    return pytest.param(case, row, id=f"{case.id}-{row.id}", marks=marks)


def _rows(stage):
    return [_param(c, r, stage) for c, r in ROWS if r.stage == stage]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _state(opt):
    """Optimizer state by (parameter position, key); skip counters are meant to change."""
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return {(index.get(id(p), -1), k): v.detach().clone() for p, s in opt.state.items() for k, v in s.items()
            if torch.is_tensor(v) and "skip" not in k and "fallback" not in k}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _assert_unchanged(model, opt, params, state, ignore_step=False):
    now = _params(model)
    moved = [n for n in params if not torch.equal(params[n], now[n])]
    assert not moved, f"parameters changed: {moved[:3]}"
    after = _state(opt)
    if ignore_step:
        state = {k: v for k, v in state.items() if k[1] != "step"}
        after = {k: v for k, v in after.items() if k[1] != "step"}
    changed = sorted({k for k in state.keys() | after.keys() if k not in state or k not in after
                      or not torch.equal(state[k], after[k])})
    assert not changed, f"optimizer state changed: {changed[:4]}"


def _skips(opt):
    return getattr(opt, "skipped_steps", None)


def _check_message(error, row):
    message = str(error)
    assert re.search(row.match, message), f"{type(error).__name__}: {message!r} does not match {row.match!r}"
    assert len(message) > 25, f"too terse to say what to do: {message!r}"


def _still_trains(case, model, opt):
    before = _params(model)
    train_step(case, model, opt, *make_batch("mlp", seed=7))
    after = _params(model)
    assert all(torch.isfinite(p).all() for p in after.values()), "non-finite parameters after a good step"
    assert any(not torch.equal(before[n], after[n]) for n in after), "a good step after the bad input did nothing"


# ------------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize("case,row", _rows("construct"))
def test_construction(case, row):
    if row.expect == "ok":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = row.make(case)
        assert isinstance(opt, torch.optim.Optimizer)
        return
    if row.expect == "warn":
        with pytest.warns(row.error, match=row.match):
            row.make(case)
        return
    with pytest.raises(row.error) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.make(case)
    _check_message(info.value, row)


# ------------------------------------------------------------------------------------------------- load_state_dict


def _trained(case, steps=2):
    from optim_cases import _trained as trained

    return trained(case, steps)


@pytest.mark.parametrize("case,row", _rows("load"))
def test_load_state_dict(case, row):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt = _trained(case)
        bad = row.make(case, opt, model)
    params, state = _params(model), _state(opt)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if row.expect == "ok":
        opt.load_state_dict(bad)
        _still_trains(case, model, opt)
        return
    with pytest.raises(row.error) as info:
        opt.load_state_dict(bad)
    _check_message(info.value, row)
    _assert_unchanged(model, opt, params, state)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    _still_trains(case, model, opt)


# ------------------------------------------------------------------------------------------------- step time


@pytest.mark.parametrize("case,row", _rows("step"))
def test_step(case, row):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt = _trained(case, steps=1)
        if row.setup is not None:
            row.setup(case, model, opt)
    lrs = [g["lr"] for g in opt.param_groups]
    params, state = _params(model), _state(opt)
    skips = _skips(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raised = None
        if row.expect == "raise":
            with pytest.raises(row.error) as info:
                row.make(case, model, opt)
            raised = info.value
        elif row.expect == "skip_or_raise":
            try:
                row.make(case, model, opt)
            except row.error as error:
                raised = error
        else:
            row.make(case, model, opt)
    if raised is not None:
        _check_message(raised, row)
    skipped = row.expect == "skip" or (row.expect == "skip_or_raise" and raised is None)
    if row.expect in ("raise", "skip", "skip_or_raise", "unchanged"):
        # A skipped step may still count itself in `step` (PSI, LoKO); everything else must be untouched.
        _assert_unchanged(model, opt, params, state, ignore_step=skipped)
    if skipped:
        assert skips is not None and _skips(opt) == skips + 1, (skips, _skips(opt))
        assert any(issubclass(w.category, RuntimeWarning) and "skip" in str(w.message) for w in caught), \
            [str(w.message)[:80] for w in caught]
    if row.expect == "ok":
        assert all(torch.isfinite(p).all() for p in _params(model).values())
    # The optimizer is not poisoned: a good step afterwards trains (with the original learning rates).
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad()
    if hasattr(opt, "clear_observation"):
        opt.clear_observation()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _still_trains(case, model, opt)


def test_the_suite_is_large_enough():
    distinct = {(row.stage, row.id) for _, row in ROWS}
    assert len(distinct) >= 60 and len(ROWS) >= 400, (len(distinct), len(ROWS))


# ------------------------------------------------------------------------------------------------- the shared API


def test_skip_counter_counts_and_warns_at_1_10_100():
    from optim_cases import CASES

    case = next(c for c in CASES if c.name == "svdlora")
    _, opt = _trained(case, steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(60):
            opt._record_skipped(torch.tensor(True), "non-finite gradient")
        opt._record_skipped(45, "non-finite lr")
        opt._record_skipped(0, "nothing")
    totals = [int(re.search(r"skipped (\d+) step", str(w.message)).group(1)) for w in caught]
    assert totals == [1, 10, 105]
    assert opt.skipped_steps == 105
    assert opt.skipped_steps_by_reason == {"non-finite gradient": 60, "non-finite lr": 45}


def test_device_counters_are_read_only_every_interval():
    from loraopt.optim.base import SkippedStepCounter

    class Counter(SkippedStepCounter):
        skip_check_interval = 4

    counter = Counter()
    reads = []
    original = Counter._sync_device_skips

    def counting_sync(self):
        reads.append(1)
        original(self)

    Counter._sync_device_skips = counting_sync
    meta = torch.ones((), dtype=torch.bool, device="meta")  # a non-CPU device: never read per call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            counter._record_skipped(meta, "x")
        assert reads == []
        try:
            counter._record_skipped(meta, "x")  # the 4th call reads (a meta tensor cannot be read: that proves it)
        except (RuntimeError, NotImplementedError):
            pass
    assert reads == [1]


def test_rank_zero_layer_is_a_clear_error():
    from optim_cases import _rank0_model
    from loraopt.lora.layers import split_lora_parameters

    with pytest.raises(ValueError, match="rank 0.*r >= 1"):
        split_lora_parameters(_rank0_model())


def test_svdlora_warns_once_that_edited_lora_grads_are_ignored():
    from optim_cases import CASES
    from toys import loss_fn

    case = next(c for c in CASES if c.name == "svdlora")
    model, opt = _trained(case, steps=1)
    x, y = make_batch("mlp", seed=4)
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.warns(UserWarning, match="ignores such edits"):
        opt.step()
