"""FSDP2 parity: 2 gloo processes with ``fully_shard`` (DTensor parameters) == one process on the concatenated batch.

Each configuration runs 5 fp32 steps three ways under FSDP2: plain, with 2 micro-batches of gradient accumulation
per step, and resumed in the middle (after step 2 the model and optimizer state are saved with
``torch.distributed.checkpoint`` state dicts, a fresh sharded model and optimizer are built and loaded, and training
goes on). Every way must end within 1e-5 of the uninterrupted single-process run on the whole batch.

On CPU the ranks use gloo. ``LORAOPT_TEST_DEVICE=cuda`` runs the same ranks on two GPUs with NCCL (the reference
single process stays on the CPU):

    LORAOPT_TEST_DEVICE=cuda python -m pytest tests/test_fsdp.py -q -p no:xdist
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loraopt
from toys import loss_fn, make_batch, make_model, sharding_wrapper

STEPS, BATCH, WORLD, RESUME_AT, TOL = 5, 16, 2, 2, 1e-5
DEVICE = os.environ.get("LORAOPT_TEST_DEVICE", "cpu")
if DEVICE == "cuda" and torch.cuda.device_count() < WORLD:
    pytest.skip(f"LORAOPT_TEST_DEVICE=cuda needs {WORLD} GPUs", allow_module_level=True)

CONFIGS = {
    "adamw": ("adamw", dict(lr=1e-2, weight_decay=0.01)),
    "sgd": ("sgd", dict(lr=0.1, momentum=0.9)),
    "adagrad": ("adagrad", dict(lr=0.1)),
    "lora-plus": ("lora-plus", dict(lr=1e-2)),
    "svdlora-sgd": ("svdlora", dict(lr=0.1, momentum=0.9)),
    "svdlora-adamw": ("svdlora", dict(lr=1e-2, base="adamw", weight_decay=0.01)),
    "loko-loss": ("loko", dict(num_outputs=None, observation="loss")),
    "psi-k1-rows": ("psi-lora", dict(lr=0.1, normalize=None, inner_iters=1, momentum=0.9)),
    "psi-k0-stream": ("psi-lora", dict(lr=0.1, normalize=None, inner_iters=0, momentum=0.9)),
    "psi-k0-adam-other": ("psi-lora", dict(lr=0.1, normalize=None, inner_iters=0, momentum=0.9, other_optimizer="adam")),
    "proj-psi-k1": ("proj-psi-lora", dict(lr=0.1, normalize=None, inner_iters=1, momentum=0.9)),
    "scaled-k0-kfac": ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, normalize=None, max_grad_norm=0.0)),
    "scaled-k1-kfac": ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, inner_iters=1, normalize=None, max_grad_norm=0.0)),
    # The factories' defaults (normalize="factored"): its row / column statistics are the ranks' means of their
    # local ones, equal to one process's when every rank sees the same batch (REPLICATED), as under DDP.
    "psi-defaults": ("psi-lora", dict(lr=1e-3)),
    "proj-psi-defaults": ("proj-psi-lora", dict(lr=1e-3)),
    "scaled-defaults": ("scaled-psi-lora", dict(lr=1e-3, other_lr=1e-2)),
    "proj-psi-full": ("proj-psi-lora", dict(lr=1e-3, normalize="full")),
}
REPLICATED = {"psi-defaults", "proj-psi-defaults", "scaled-defaults", "proj-psi-full"}
# Not here: internal clipping (max_grad_norm > 0) and the Shampoo metric, whose data-parallel versions use per-rank
# norms / statistics, as under DDP (specs/psi-lora.md §10.4), so they are not equal to one process by construction.
# LoKO-scalar updates from one observed loss per step: it has no gradient accumulation to test.
NO_ACCUMULATION = {"loko-loss"}
MODES = ("plain", "accum", "resume", "swap")
# Refused under FSDP2, with a NotImplementedError that says so (never a silent fallback).
REFUSED = {
    "riemannian-sgd": ("riemannian-sgd", dict(lr=0.1)),
    "riemannian-adamw": ("riemannian-adamw", dict(lr=1e-2)),
    "loko-softmax": ("loko", dict(num_outputs=3)),
}


def shard_model(model):
    """FSDP2 the usual way: one ``fully_shard`` per LoRA-wrapped layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),))
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _build(config, sharded, swap=False, configs=CONFIGS):
    """``swap``: what accelerate's FSDP2 preparation (and so HF Trainer) does: build the optimizer on the whole
    model, shard the model, then replace the optimizer's parameters by the sharded ones (matched by name)."""
    name, kwargs = configs[config]
    model = make_model("mlp")
    if sharded and DEVICE != "cpu":
        model.to(torch.device(DEVICE, torch.cuda.current_device()))
    if sharded and not swap:
        shard_model(model)
    opt = loraopt.create_optimizer(name, model, **kwargs)
    if swap:
        position = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        order = [[position[id_to_name] for id_to_name in _names(model, g["params"])] for g in opt.param_groups]
        shard_model(model)
        new = list(model.named_parameters())
        for group, indices in zip(opt.param_groups, order):
            group["params"] = [new[i][1] for i in indices]
    return model, opt


def _names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _one_step(config, model, opt, t, rank, world, accum):
    x, y = make_batch("mlp", n=BATCH, seed=100 + t)
    per_rank = BATCH if config in REPLICATED else BATCH // world
    if config not in REPLICATED:
        x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    opt.zero_grad()
    micro = 2 if accum else 1
    size = per_rank // micro
    for k in range(micro):
        loss = loss_fn(model, x[k * size : (k + 1) * size], y[k * size : (k + 1) * size]) / micro
        if config.startswith("loko"):
            opt.observe(loss)
        loss.backward()
    opt.step()


def _save_and_reload(config, model, opt, path):
    """DCP round trip of the sharded model and optimizer state into a freshly built sharded model/optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    model, opt = _build(config, sharded=True)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return model, opt


def train(config, mode="plain", rank=0, world=1, sharded=False, ckpt=None):
    model, opt = _build(config, sharded, swap=sharded and mode == "swap")
    for t in range(STEPS):
        if mode == "resume" and t == RESUME_AT and sharded:
            model, opt = _save_and_reload(config, model, opt, ckpt)
        _one_step(config, model, opt, t, rank, world, accum=mode == "accum")
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        for n, p in model.named_parameters()
    }


def _worker(rank, out_dir, configs):
    torch.set_num_threads(1)
    rendezvous = "file://" + os.path.join(out_dir, "rendezvous")
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        for config, (name, kwargs) in REFUSED.items():
            try:
                loraopt.create_optimizer(name, shard_model(make_model("mlp")), **kwargs)
                message = "built"
            except NotImplementedError as error:
                message = str(error)
            if rank == 0:
                torch.save({"message": message}, os.path.join(out_dir, f"refused-{config}.pt"))
            if name == "loko":
                continue
            try:  # built before sharding, parameters swapped afterwards (accelerate's FSDP2 path)
                model, opt = _build(config, True, swap=True, configs=REFUSED)
                _one_step(config, model, opt, 0, rank, WORLD, accum=False)
                message = "stepped"
            except NotImplementedError as error:
                message = str(error)
            if rank == 0:
                torch.save({"message": message}, os.path.join(out_dir, f"refused-swap-{config}.pt"))
        for config in configs:
            for mode in MODES:
                if mode == "accum" and config in NO_ACCUMULATION:
                    continue
                try:
                    ckpt = os.path.join(out_dir, f"ckpt-{config}")
                    params = train(config, mode, rank, WORLD, sharded=True, ckpt=ckpt)
                    result = {"params": params}
                except Exception as error:  # reported by the test (the same error is raised on both ranks)
                    result = {"error": f"{type(error).__name__}: {error}"}
                torch.save(result, os.path.join(out_dir, f"{config}-{mode}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in test_distributed.py: skip interpreter teardown with gloo threads alive


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    sys.path.insert(0, os.path.dirname(__file__))
    mp.spawn(_worker, args=(str(out), list(CONFIGS)), nprocs=WORLD, join=True)
    return out


CASES = [(c, m) for c in CONFIGS for m in MODES if not (m == "accum" and c in NO_ACCUMULATION)]


@pytest.mark.parametrize("config,mode", CASES)
def test_fsdp2_two_ranks_equal_single_process(config, mode, fsdp_results):
    torch.set_num_threads(1)
    single = train(config)  # uninterrupted, whole batch, no accumulation
    ranks = [torch.load(fsdp_results / f"{config}-{mode}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for result in ranks:
        assert "error" not in result, result.get("error")
    worst = 0.0
    for n, p in single.items():
        a, b = ranks[0]["params"][n], ranks[1]["params"][n]
        assert torch.equal(a, b), f"ranks disagree on {n}"
        worst = max(worst, float((a - p).abs().max()))
    print(f"{config} {mode}: max |FSDP2 - single| = {worst:.2e}")
    assert worst <= TOL, (config, mode, worst)
    moved = max(float((single[n] - p.detach()).abs().max()) for n, p in make_model("mlp").named_parameters())
    assert moved > 1e-4, "the run did not train"


@pytest.mark.parametrize("config", list(REFUSED))
def test_unsupported_optimizers_refuse_fsdp2_clearly(config, fsdp_results):
    message = torch.load(fsdp_results / f"refused-{config}.pt", weights_only=True)["message"]
    assert message != "built", f"{config} was built on FSDP2 parameters instead of refusing them"
    assert "FSDP2" in message and "DTensor" in message, message
    if REFUSED[config][0] != "loko":
        message = torch.load(fsdp_results / f"refused-swap-{config}.pt", weights_only=True)["message"]
        assert message != "stepped", f"{config} stepped on swapped-in FSDP2 parameters instead of refusing them"
        assert "FSDP2" in message and "DTensor" in message, message


@pytest.mark.parametrize("name", ["svdlora", "loko", "psi-lora", "scaled-psi-lora", "proj-psi-lora"])
@pytest.mark.parametrize("wrapper", ["DeepSpeedEngine", "FullyShardedDataParallel"])
def test_deepspeed_and_fsdp1_are_refused_naming_fsdp2(name, wrapper, monkeypatch):
    """ZeRO and FSDP1 flatten the parameters: refused, and the message names FSDP2 as the supported sharded path."""
    wrapped = sharding_wrapper(wrapper, make_model("mlp"), monkeypatch)
    kwargs = {"loko": dict(num_outputs=None, observation="loss")}.get(name, dict(lr=1e-2))
    with pytest.raises(NotImplementedError, match="FSDP2") as info:
        loraopt.create_optimizer(name, wrapped, **kwargs)
    assert wrapper in str(info.value) and "fully_shard" in str(info.value)


EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "fsdp2_trainer.py")


def test_fsdp2_trainer_example_builds_its_arguments():
    import subprocess

    out = subprocess.run([sys.executable, EXAMPLE, "--check"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fsdp: True 2 optimizer: svdlora" in out.stdout, out.stdout


def test_accelerate_config_selects_fsdp_version_2():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(os.path.dirname(EXAMPLE), "accelerate_fsdp2.yaml"))
    assert str(config.distributed_type) == "FSDP" or config.distributed_type.value == "FSDP"
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"


@pytest.mark.slow
def test_fsdp2_trainer_example_trains_and_resumes_with_torchrun(tmp_path):
    """A real 2-process run of the example on CPU. accelerate runs it as plain data parallelism there (it enables
    FSDP only on accelerators); the run still exercises the factory, Trainer and resume_from_checkpoint."""
    import subprocess

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", EXAMPLE,
         "--optimizer", "svdlora", "--resume-check", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=os.path.dirname(EXAMPLE),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "max |diff| = 0.00e+00" in out.stdout, out.stdout
