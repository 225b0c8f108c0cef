"""``loraopt bench online --ensemble``: the stacked AdamW / AdaGrad updates against torch's optimizers, the
ensemble's member records against the separate runs, and the CLI (records, resume, merge, refusal)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from loraopt.cli import main as cli_main
from loraopt.optim.registry import create_optimizer
from loraopt_bench import online
from loraopt_bench import online_ensemble as ens

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(4, 3), (5,), (2, 3, 1, 1)]


def _flat(members):
    """Per member a list of tensors -> the (E, N) flat stack and, per tensor, its (E, ...) view."""
    flat, views = ens.stack_parameters(members[0], len(members))
    with torch.no_grad():
        for e, tensors in enumerate(members):
            flat[e] = torch.cat([t.detach().reshape(-1) for t in tensors])
    return flat, [v.detach() for v in views]


def _grads(step, members, nonfinite=None):
    """(E, N) gradients; member ``nonfinite`` gets a NaN at step 3."""
    g = torch.Generator().manual_seed(100 + step)
    grads = torch.randn(members, sum(math.prod(s) for s in SHAPES), generator=g, dtype=torch.float64)
    if nonfinite is not None and step == 3:
        grads[nonfinite, 5] = float("nan")
    return grads


def _split(flat_row):
    return [piece.view(shape) for piece, shape in zip(flat_row.split([math.prod(s) for s in SHAPES]), SHAPES)]


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind", ["adamw", "adagrad"])
def test_stacked_update_equals_the_torch_optimizer_per_member_with_two_parameter_groups(kind):
    """Different lrs per member, a second parameter group (the last two tensors) with its own lr and weight decay,
    and the non-default hyperparameters of each algorithm; float64, six steps, parameters and state."""
    lrs = [1e-3, 3e-2, 0.3]
    extra = dict(betas=(0.8, 0.99), eps=1e-6) if kind == "adamw" else dict(lr_decay=0.1, eps=1e-8,
                                                                           initial_accumulator_value=0.05)
    torch_cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adagrad
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in SHAPES]
    members, optimizers = [], []
    for e, lr in enumerate(lrs):
        params = [nn.Parameter(t.clone()) for t in init]
        members.append(params)
        optimizers.append(torch_cls([{"params": params[:1], "weight_decay": 0.0},
                                     {"params": params[1:], "lr": lr / 3, "weight_decay": 0.05 * (e + 1)}],
                                    lr=lr, **extra))
    flat, views = _flat(members)
    groups = [[opt.param_groups[0]] + [opt.param_groups[1]] * (len(SHAPES) - 1) for opt in optimizers]
    cls = ens.StackedAdamW if kind == "adamw" else ens.StackedAdagrad
    stacked = cls.from_groups(flat, [math.prod(s) for s in SHAPES], groups, skip_nonfinite=False)
    assert stacked.values["lr"].shape == (3, 2)
    for step in range(6):
        grads = _grads(step, len(lrs))
        for e, (params, opt) in enumerate(zip(members, optimizers)):
            for p, grad in zip(params, _split(grads[e])):
                p.grad = grad.clone()
            opt.step()
        stacked.step(grads)
    for e, (params, opt) in enumerate(zip(members, optimizers)):
        for i, p in enumerate(params):
            _close(views[i][e], p.detach())  # the views see the flat tensor's update
        for key, value in stacked.state.items():
            for piece, p in zip(_split(value[e]), params):
                _close(piece, opt.state[p][key])
        assert float(stacked.step_count[e]) == float(opt.state[params[0]]["step"]) == 6
    # The members really differ (a shared lr would fail the comparison above).
    assert not torch.allclose(views[0][0], views[0][2])


@pytest.mark.parametrize("kind", ["adamw", "adagrad"])
def test_stacked_update_skips_a_members_nonfinite_step_like_the_library_optimizer(kind):
    """The library factories' optimizers skip a step whose gradient has a NaN (the guard): so does the stacked
    update, for that member only, and its step count does not advance."""
    lrs = [1e-2, 1e-1]
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in SHAPES]
    modules, optimizers = [], []
    for lr in lrs:
        module = nn.ParameterList([nn.Parameter(t.clone()) for t in init])
        modules.append(module)
        optimizers.append(create_optimizer(kind, module, lr=lr))
    assert all(opt.skip_nonfinite for opt in optimizers)
    flat, views = _flat([list(m) for m in modules])
    cls = ens.StackedAdamW if kind == "adamw" else ens.StackedAdagrad
    stacked = cls.from_groups(flat, [math.prod(s) for s in SHAPES],
                              [[opt.param_groups[0]] * len(SHAPES) for opt in optimizers])
    assert stacked._index is None  # one column: the hyperparameters broadcast as (E, 1)
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        for step in range(5):
            grads = _grads(step, len(lrs), nonfinite=1)
            for e, (module, opt) in enumerate(zip(modules, optimizers)):
                for p, grad in zip(module, _split(grads[e])):
                    p.grad = grad.clone()
                opt.step()
            stacked.step(grads)
    assert [opt.skipped_steps for opt in optimizers] == [0, 1]
    assert stacked.step_count.tolist() == [5.0, 4.0]
    for e, module in enumerate(modules):
        for i, p in enumerate(module):
            _close(views[i][e], p.detach())
    assert torch.isfinite(flat).all()


def test_stacked_update_takes_one_value_or_one_per_member():
    flat = torch.zeros(3, 2, dtype=torch.float64)
    adamw = ens.StackedAdamW(flat, lr=[1e-3, 1e-2, 1e-1], betas=[(0.9, 0.99)] * 3, weight_decay=0.1)
    assert adamw.values["lr"].flatten().tolist() == [1e-3, 1e-2, 1e-1]
    assert adamw.values["beta2"].flatten().tolist() == [0.99] * 3 and adamw._decays
    with pytest.raises(ValueError, match="2 values for 3 members"):
        ens.StackedAdagrad(flat, lr=[1e-3, 1e-2])
    with pytest.raises(ValueError, match="amsgrad"):
        ens.StackedAdamW.group_hparams({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                        "amsgrad": True})


def _digits_tasks(samples, seed=1, eval_samples=100):
    return [online.RunTask("digits", method, index, seed, samples, eval_samples)
            for method in ("adamw", "adagrad") for index in range(len(online.METHODS[method].grid))]


@pytest.mark.parametrize("path", ["batch", "vmap"])
def test_ensemble_records_equal_the_separate_runs_on_the_toy_stream(monkeypatch, path):
    """Ten members (AdamW and AdaGrad, five lrs each) against ten ``run_one`` calls, on either path: identical
    prequential flags and held-out accuracy; final parameters equal up to float32 rounding, far closer than to any
    other member's."""
    tasks = _digits_tasks(60)
    # Members listed AdaGrad first: the ensemble reorders them internally and must give them back in this order.
    tasks = tasks[5:] + tasks[:5]
    adapters = []
    real_build = online.build_model
    monkeypatch.setattr(online, "build_model", lambda *a, **k: adapters.append(real_build(*a, **k)) or adapters[-1])
    initial = {n: p.detach().clone() for n, p in real_build("toy-mlp", 10, 1).model.named_parameters()
               if p.requires_grad}
    outcome = ens.ensemble_pass(ens.EnsembleTask(tuple(tasks)), path=path)
    assert {r["ensemble_path"] for r in outcome.records} == {path}
    finals, records = [], []
    for task in tasks:
        records.append(online.run_one(task))
        finals.append({n: p.detach().clone() for n, p in adapters[-1].model.named_parameters() if p.requires_grad})
    assert len(outcome.records) == len(tasks) and set(outcome.params) == set(initial)
    for k, (task, record, final) in enumerate(zip(tasks, records, finals)):
        member = outcome.records[k]
        assert set(record) <= set(member), set(record) - set(member)
        assert member["correct"] == record["correct"], task
        assert member["held_out_acc"] == record["held_out_acc"] and member["final_acc"] == record["final_acc"]
        assert member["optimizer_defaults"] == record["optimizer_defaults"]
        assert member["optimizer_defaults"]["lr"] == online.METHODS[task.method].grid[task.grid_index]["lr"]
        for key in ("phase_starts", "nonfinite_logits", "lora", "trainable_parameters", "seed"):
            assert member[key] == record[key], key
        assert member["ensemble_size"] == len(tasks)
        assert member["sec_per_sample"] * len(tasks) == pytest.approx(member["ensemble_sec_per_sample"])
        # Parameters: the gap to the separate run is tiny against how far the run moved them, and against the gap
        # to the run with the next lr of the same method (a wrong lr or a missed step would fail).
        for name, value in final.items():
            moved = (value - initial[name]).abs().max()
            gap = (outcome.params[name][k] - value).abs().max()
            assert gap <= 1e-4 * moved + 1e-7, (task, name, float(gap), float(moved))
        neighbour = k + 1 if k % 5 < 4 else k - 1
        assert max(float((outcome.params[n][k] - finals[neighbour][n]).abs().max()) for n in final) > 1e-3


def test_group_ensembles_per_stream_and_seed_and_a_lone_member_runs_alone():
    tasks = _digits_tasks(8, seed=0) + _digits_tasks(8, seed=1)[:1] + [
        online.RunTask("digits", "loko", 0, 0, 8, 20), online.RunTask("digits", "psi-lora", 0, 0, 8, 20)]
    ensembles, others = ens.group_ensembles(tasks)
    assert [len(e.members) for e in ensembles] == [10]
    assert {t.method for t in ensembles[0].members} == {"adamw", "adagrad"} and ensembles[0].seed == 0
    assert [(t.method, t.seed) for t in others] == [("loko", 0), ("psi-lora", 0), ("adamw", 1)]
    with pytest.raises(ValueError, match="not an AdamW/AdaGrad"):
        ens.EnsembleTask((online.RunTask("digits", "loko", 0, 0, 8, 20),))


def test_cli_ensemble_saves_member_records_resumes_and_merges_like_the_separate_runs(tmp_path, monkeypatch):
    base = ["bench", "online", "--streams", "digits", "--methods", "adamw,adagrad,loko-scalar", "--samples", "16",
            "--eval-samples", "20", "--seeds", "2", "--no-progress"]
    singles, ensembles = [], []
    real_run_one, real_run_ensemble = online.run_one, ens.run_ensemble
    monkeypatch.setattr(online, "run_one", lambda task: singles.append(task) or real_run_one(task))
    monkeypatch.setattr(ens, "run_ensemble", lambda task: ensembles.append(task) or real_run_ensemble(task))
    per_run, ensembled = tmp_path / "per_run", tmp_path / "ensembled"
    assert cli_main(base + ["--records", str(per_run), "--out", str(tmp_path / "a")]) == 0
    assert len(singles) == 22 and not ensembles
    singles.clear()
    assert cli_main(base + ["--ensemble", "--records", str(ensembled), "--out", str(tmp_path / "b")]) == 0
    assert [len(e.members) for e in ensembles] == [10, 10] and {e.seed for e in ensembles} == {0, 1}
    assert {t.method for t in singles} == {"loko-scalar"} and len(singles) == 2
    record_files = sorted(p.relative_to(ensembled) for p in ensembled.rglob("*.json"))
    assert record_files == sorted(p.relative_to(per_run) for p in per_run.rglob("*.json")) and len(record_files) == 22
    assert "ran as ensembles of 10 members" in (tmp_path / "b" / "summary.md").read_text()
    assert json.loads((tmp_path / "b" / "digits.json").read_text())["config"]["ensemble"] is True
    saved = json.loads((ensembled / "digits" / "adagrad-g2-s1-n16.json").read_text())
    assert saved["record"]["ensemble_size"] == 10 and "ensemble" in saved["command"]
    # Resume: nothing new runs; with three member records gone, only those three run, as one ensemble.
    singles.clear(), ensembles.clear()
    assert cli_main(base + ["--ensemble", "--records", str(ensembled), "--out", str(tmp_path / "c")]) == 0
    assert not singles and not ensembles
    for name in ("adamw-g0-s1-n16.json", "adamw-g4-s1-n16.json", "adagrad-g1-s1-n16.json"):
        (ensembled / "digits" / name).unlink()
    assert cli_main(base + ["--ensemble", "--records", str(ensembled), "--out", str(tmp_path / "d")]) == 0
    assert not singles and len(ensembles) == 1
    assert sorted((t.method, t.grid_index, t.seed) for t in ensembles[0].members) == [
        ("adagrad", 1, 1), ("adamw", 0, 1), ("adamw", 4, 1)]
    # The merges of the two record folders agree on every accuracy.
    assert cli_main(["bench", "online", "--merge", str(per_run), "--out", str(tmp_path / "m1")]) == 0
    assert cli_main(["bench", "online", "--merge", str(ensembled), "--out", str(tmp_path / "m2")]) == 0
    a = json.loads((tmp_path / "m1" / "digits.json").read_text())["runs"]
    b = json.loads((tmp_path / "m2" / "digits.json").read_text())["runs"]
    assert set(a) == set(b) and len(a) == 11
    for label in a:
        for key in ("online_acc", "online_acc_std", "final_acc", "final_acc_std", "prequential_acc", "window_acc",
                    "held_out_acc", "phase_acc"):
            assert a[label][key] == b[label][key], (label, key)
    assert json.loads((tmp_path / "m1" / "digits.json").read_text())["best"] == json.loads(
        (tmp_path / "m2" / "digits.json").read_text())["best"]


def test_a_model_vmap_cannot_run_is_refused_with_the_model_name(tmp_path, monkeypatch, capsys):
    real_build = online.build_model

    def data_dependent(*args, **kwargs):
        adapter = real_build(*args, **kwargs)
        model = adapter.model.train()  # in training mode the members cannot run as a batch: vmap it is
        # Python control flow on a value of the output: fine for one model, impossible under vmap.
        adapter.forward = lambda x: model(x) if float(model(x).sum()) > -1e30 else -model(x)
        return adapter

    monkeypatch.setattr(online, "build_model", data_dependent)
    with pytest.raises(ens.EnsembleUnsupportedError, match="toy-mlp model .*drop --ensemble"):
        ens.run_ensemble(ens.EnsembleTask(tuple(_digits_tasks(4)[:2])))
    args = ["bench", "online", "--streams", "digits", "--methods", "adamw", "--samples", "4", "--eval-samples", "10",
            "--seeds", "1", "--no-progress", "--ensemble", "--out", str(tmp_path)]
    assert cli_main(args) == 1
    assert "drop --ensemble" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- members as a batch


class _Convs(nn.Module):
    """A small CNN with the layer kinds of the online models: a strided, padded 3x3 conv and a 1x1 conv (both get
    LoRA), a frozen batch norm (eval mode) and a depthwise conv between them, and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.point = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.norm(self.stem(x)))
        h = torch.relu(self.point(self.depthwise(h)))
        return self.head(h.mean((2, 3)))


class _Tokens(nn.Module):
    """Linear layers on (batch, tokens, features) inputs, as in a transformer block, and a Linear head."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(5, 5)
        self.value = nn.Linear(5, 5, bias=False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        scores = torch.softmax(self.query(x) @ x.transpose(1, 2), -1)
        return self.head((scores @ self.value(x)).mean(1))


def _peft(base, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    model = get_peft_model(base, LoraConfig(target_modules=targets, r=2, lora_alpha=4, modules_to_save=["head"]))
    model = model.double().eval()
    with torch.no_grad():  # B = 0 at PEFT's init would hide a wrong B path
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", ["convs", "tokens"])
def test_members_as_batch_equal_separate_passes_in_float64(kind):
    """Logits and every trainable parameter's gradient of four members, each with its own parameters, from one pass
    of the members as a batch against four ``functional_call`` passes: equal to 1e-12 (float64)."""
    pytest.importorskip("peft")
    from torch.func import functional_call

    if kind == "convs":
        model, x = _peft(_Convs(), ["stem", "point"]), torch.randn(1, 3, 9, 9, dtype=torch.float64)
    else:
        model, x = _peft(_Tokens(), ["query", "value"]), torch.randn(1, 4, 5, dtype=torch.float64)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    assert ens.members_as_batch_refusal(model, names) is None
    members = 4
    flat, stacked = ens.stack_parameters([p for _, p in named], members)
    with torch.no_grad():
        flat.add_(0.2 * torch.randn_like(flat))  # members differ
    label = torch.tensor([1])
    with ens.members_as_batch(model, names, stacked):
        logits = model(ens.repeat_sample(x, members))
    assert logits.shape == (members, 4 if kind == "convs" else 3)
    torch.nn.functional.cross_entropy(logits, label.expand(members), reduction="sum").backward()
    for e in range(members):
        values = {n: s.detach()[e].clone().requires_grad_() for n, s in zip(names, stacked)}
        expected = functional_call(model, values, (x,))
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(expected, label), list(values.values()))
        torch.testing.assert_close(logits[e].detach(), expected[0].detach(), rtol=1e-12, atol=1e-12)
        for name, s, g in zip(names, stacked, grads):
            torch.testing.assert_close(s.grad[e], g, rtol=1e-12, atol=1e-12, msg=name)
    # The context restores the modules' own forward: the model is itself again afterwards.
    torch.testing.assert_close(model(x), functional_call(model, {n: p for n, p in named}, (x,)))


def test_members_as_batch_refusals_name_what_stands_in_the_way():
    pytest.importorskip("peft")
    model = _peft(_Convs(), ["stem", "point"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model.base_model.model.norm.train()
    assert "training mode" in ens.members_as_batch_refusal(model, names)
    model.eval()
    model.base_model.model.norm.weight.requires_grad_(True)
    assert "norm.weight is not the weight or bias of a plain" in ens.members_as_batch_refusal(
        model, names + ["base_model.model.norm.weight"])
    model.base_model.model.stem.base_layer.padding_mode = "reflect"  # no LoRA on it: only its LoRA factors count
    assert ens.members_as_batch_refusal(model, names) is None
    flat, stacked = ens.stack_parameters([p for n, p in model.named_parameters() if n in names], 2)
    with pytest.raises(ens.EnsembleUnsupportedError, match="training mode"):
        ens.members_as_batch(model.train(), names, stacked)
    with pytest.raises(ens.EnsembleUnsupportedError, match="batch-1"):
        ens.repeat_sample(torch.zeros(2, 3), 4)


class _Tied(nn.Module):
    """Reads a Linear's weight (the same Parameter, so tied) outside that Linear's forward."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def test_auto_falls_back_to_vmap_when_the_first_sample_check_fails(monkeypatch):
    """The head's weight tied into a second module: the batch pass swaps only the head's own forward, so the second
    module would use the shared copy for every member; the first-sample check against separate passes catches the
    missing gradient, and ``auto`` runs vmap (with a warning), which swaps tied weights; ``path="batch"`` refuses."""
    real_build = online.build_model

    def reads_its_head(*args, **kwargs):
        adapter = real_build(*args, **kwargs)
        model = adapter.model
        inner = model.base_model.model
        inner.tied = _Tied(inner.head.modules_to_save["default"]).eval()
        adapter.forward = lambda x: model(x) + 0.5 * inner.tied(x)
        return adapter

    monkeypatch.setattr(online, "build_model", reads_its_head)
    task = ens.EnsembleTask(tuple(_digits_tasks(6)[:3]))
    with pytest.warns(RuntimeWarning, match="first-sample check"):
        outcome = ens.ensemble_pass(task)
    assert {r["ensemble_path"] for r in outcome.records} == {"vmap"}
    with pytest.raises(ens.EnsembleUnsupportedError, match="cannot run as a batch"):
        ens.ensemble_pass(task, path="batch")
    with pytest.raises(ValueError, match="path must be one of"):
        ens.ensemble_pass(task, path="loop")


# ------------------------------------------------------------------------------------------------- CUDA graphs


def test_graph_needs_cuda_and_the_batch_path_and_otherwise_runs_the_eager_steps(capsys):
    tasks = tuple(_digits_tasks(12)[:4])
    eager = ens.ensemble_pass(ens.EnsembleTask(tasks))
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        graphed = ens.ensemble_pass(ens.EnsembleTask(tasks, graph=True))
    assert [r["ensemble_path"] for r in graphed.records] == ["batch"] * 4
    assert [r["correct"] for r in graphed.records] == [r["correct"] for r in eager.records]
    for name in eager.params:
        torch.testing.assert_close(graphed.params[name], eager.params[name], rtol=0, atol=0)
    with pytest.raises(SystemExit):
        cli_main(["bench", "online", "--streams", "digits", "--methods", "adamw", "--graph", "--samples", "4"])
    assert "use it with --ensemble" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the real capture and replay")
def test_graphed_ensemble_replays_the_eager_trajectory_on_a_gpu(monkeypatch):
    """The toy stream on a GPU, eager vs graphed: the same prequential flags and held-out accuracies, final
    parameters equal to float32 rounding (the warm-up steps before capture must leave no trace)."""
    tasks = tuple(online.RunTask("digits", method, index, 1, 40, 100, device="cuda")
                  for method in ("adamw", "adagrad") for index in range(len(online.METHODS[method].grid)))
    eager = ens.ensemble_pass(ens.EnsembleTask(tasks))
    graphed = ens.ensemble_pass(ens.EnsembleTask(tasks, graph=True))
    assert {r["ensemble_path"] for r in graphed.records} == {"batch+graph"}
    for a, b in zip(eager.records, graphed.records):
        assert a["correct"] == b["correct"] and a["held_out_acc"] == b["held_out_acc"]
    for name in eager.params:
        torch.testing.assert_close(graphed.params[name], eager.params[name], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the real capture and replay")
def test_graphed_steps_capture_one_graph_per_shape_and_restore_the_state_after_warm_up():
    """A step that changes a state tensor in place, fed inputs of two shapes in turn: one graph per shape, and the
    replayed results equal the eager ones step for step (the warm-up runs are undone)."""
    def make():
        state = torch.zeros(3, device="cuda")

        def step(x, label):
            state.add_(x.sum() * label)
            return (state * 2).clone()

        return state, step

    eager_state, eager_step = make()
    graph_state, graph_step = make()
    graphed = ens.GraphedSteps(graph_step, [graph_state])
    for k in range(6):
        x = torch.full((1, 2 + k % 2), float(k + 1), device="cuda")
        label = torch.tensor([1.0 + k], device="cuda")
        torch.testing.assert_close(graphed(x, label).clone(), eager_step(x, label))
    assert len(graphed.graphs) == 2 and graphed.failure is None
    torch.testing.assert_close(graph_state, eager_state)
