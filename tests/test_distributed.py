"""DDP parity: 2 gloo processes == one process on the concatenated batch (specs/psi-lora.md §10.4, §11)."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import loraopt
from toys import loss_fn, make_batch, make_model

STEPS, BATCH, WORLD = 5, 16, 2

CONFIGS = {
    "psi-k1-rows": ("psi-lora", dict(lr=0.1, normalize=None, inner_iters=1, momentum=0.9)),
    "psi-k0-stream": ("psi-lora", dict(lr=0.1, normalize=None, inner_iters=0, momentum=0.9)),
    "scaled-k0-kfac": ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, normalize=None, max_grad_norm=0.0)),
    "scaled-k1-kfac": ("scaled-psi-lora", dict(lr=0.1, other_lr=1e-2, inner_iters=1, normalize=None, max_grad_norm=0.0)),
    "proj-k1-rows": ("proj-psi-lora", dict(lr=0.1, normalize=None, inner_iters=1, momentum=0.9)),
    "proj-k0-rows": ("proj-psi-lora", dict(lr=0.1, normalize=None, inner_iters=0, momentum=0.9, other_optimizer="adam")),
    # The step normalisations use the ranks' mean of their local statistics (a second moment at the per-rank batch,
    # documented), which equals the single process's only when every rank sees the same batch: REPLICATED.
    "psi-k1-factored": ("psi-lora", dict(lr=1e-3, normalize="factored", max_grad_norm=0.0, inner_iters=1)),
    "proj-k1-factored": ("proj-psi-lora", dict(lr=1e-3, normalize="factored", max_grad_norm=0.0, inner_iters=1)),
    "psi-k1-layer": ("psi-lora", dict(lr=1e-3, normalize="layer", max_grad_norm=0.0, inner_iters=1)),
    "scaled-defaults": ("scaled-psi-lora", dict(lr=1e-3, other_lr=1e-2)),  # normalize="factored", K = 0
    "proj-k1-full": ("proj-psi-lora", dict(lr=1e-3, normalize="full", max_grad_norm=0.0, inner_iters=1)),
}
REPLICATED = {"psi-k1-factored", "proj-k1-factored", "psi-k1-layer", "scaled-defaults", "proj-k1-full"}


def _train(model, opt, rank=0, world=1, replicated=False):
    for t in range(STEPS):
        x, y = make_batch("mlp", n=BATCH, seed=100 + t)
        shard = slice(None) if replicated else slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        loss_fn(model, x[shard], y[shard]).backward()
        opt.step()


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    # File rendezvous: no TCP port that a concurrent test run could also pick.
    rendezvous = "file://" + os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        for config, (name, kwargs) in CONFIGS.items():
            model = make_model("mlp")
            ddp = DistributedDataParallel(model)
            opt = loraopt.create_optimizer(name, ddp, **kwargs)
            _train(ddp, opt, rank, WORLD, replicated=config in REPLICATED)
            params = {n: p.detach() for n, p in model.named_parameters()}
            torch.save(params, os.path.join(out_dir, f"{config}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: freeing DDP's reducer there can deadlock on the GIL with gloo's worker thread
    # (seen with torch 2.13). Everything this worker produces is already on disk.
    os._exit(0)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """One 2-process run covering every configuration (spawning is the expensive part)."""
    out = tmp_path_factory.mktemp("ddp")
    sys.path.insert(0, os.path.dirname(__file__))  # the spawned workers import this module
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("config", list(CONFIGS))
def test_two_process_ddp_equals_single_process(config, ddp_results):
    name, kwargs = CONFIGS[config]
    single = make_model("mlp")
    _train(single, loraopt.create_optimizer(name, single, **kwargs))
    ranks = [torch.load(ddp_results / f"{config}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for n, p in single.named_parameters():
        assert torch.equal(ranks[0][n], ranks[1][n]), f"ranks disagree on {n}"
        assert torch.allclose(ranks[0][n], p.detach(), atol=1e-6, rtol=0), (n, (ranks[0][n] - p).abs().max())
