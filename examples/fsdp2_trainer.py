"""A loraopt optimizer with the Hugging Face Trainer under FSDP2 (``fully_shard``, accelerate's FSDP plugin v2).

    torchrun --nproc_per_node 2 examples/fsdp2_trainer.py --optimizer svdlora
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/fsdp2_trainer.py --optimizer svdlora
    python examples/fsdp2_trainer.py --check         # builds the arguments and the model, trains nothing

Run it on GPUs (one process per GPU). On CPU processes (``--cpu``, the default without CUDA) accelerate 1.15 ignores
its FSDP plugin (it enables FSDP only for accelerator backends) and the run is plain data parallelism; the script
says so. The tiny random BERT trains in seconds.

How it fits together:

* Trainer wraps the model with FSDP2 first and only then calls the factory (``optimizer_cls_and_kwargs``), so the
  optimizer is built over the sharded (DTensor) parameters, which is what loraopt needs: its optimizers gather the
  whole LoRA factors they need, compute the same update on every rank and write back each rank's shard.
* ``optimizers=(optimizer, None)`` is refused by Trainer under FSDP: use the factory.
* Supported under FSDP2: ``psi-lora``, ``proj-psi-lora``, ``scaled-psi-lora``, ``svdlora``, the baselines
  ``adamw``, ``sgd``, ``adagrad``, ``lora-plus``, and LoKO-scalar (``--optimizer loko``: ``observation="loss"``
  through ``LoKOScalarTrainer``).
  Riemannian LoRA (PEFT's) and LoKO's output observations raise ``NotImplementedError`` under FSDP2.
* Checkpoints: ``fsdp_state_dict_type: SHARDED_STATE_DICT`` saves model and optimizer with
  ``torch.distributed.checkpoint``; ``--resume-check`` trains ``--steps`` steps straight through, then again with a
  checkpoint at ``--steps // 2`` and ``resume_from_checkpoint``, and prints the largest parameter difference.
* Trainer's own clipping (``max_grad_norm``) only rescales ``.grad``; the hook-based optimizers clip internally, so
  it is 0 here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transformers import Trainer, TrainingArguments  # noqa: E402

from loraopt.integrations.hf import LoKOFactory, LoKOScalarTrainer, LoRAOptFactory  # noqa: E402

from _toy_task import build_task  # noqa: E402

HYPERPARAMETERS = {
    "svdlora": dict(lr=0.05, momentum=0.9),
    # The paper's plain step (an SGD lr on Delta W), as this toy was tuned; without lr and normalize the factories
    # give the library's default, normalize="factored" at lr 3e-5.
    "psi-lora": dict(lr=0.05, momentum=0.9, normalize=None),
    "proj-psi-lora": dict(lr=0.05, momentum=0.9, normalize=None),
    "scaled-psi-lora": dict(lr=0.05, other_lr=1e-2, normalize=None, max_grad_norm=1.0),
    "adamw": dict(lr=1e-2),
    "lora-plus": dict(lr=1e-2),
    "loko": dict(observation="loss"),
}


def fsdp_arguments(output_dir: str, args: argparse.Namespace, **overrides) -> TrainingArguments:
    """TrainingArguments for FSDP2. Under ``accelerate launch`` the config file's FSDP plugin takes precedence."""
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        max_grad_norm=0.0,
        fsdp=True,
        fsdp_config={
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["BertLayer"],
            "reshard_after_forward": True,
            "state_dict_type": "SHARDED_STATE_DICT",
        },
        use_cpu=args.cpu,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_strategy="no",
        save_strategy="no",
        seed=0,
        data_seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def build_trainer(output_dir: str, args: argparse.Namespace, **overrides) -> Trainer:
    task = build_task("tiny", train_size=args.batch_size * args.steps * 2)
    hp = dict(HYPERPARAMETERS[args.optimizer])
    if args.optimizer == "loko":
        factory, cls = LoKOFactory, LoKOScalarTrainer
    else:
        factory, cls = LoRAOptFactory.for_optimizer(args.optimizer), Trainer
    return cls(
        model=task.model,
        args=fsdp_arguments(output_dir, args, **overrides),
        train_dataset=task.train,
        optimizer_cls_and_kwargs=(factory, hp),
    )


def trained_parameters(trainer: Trainer) -> dict:
    out = {}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().cpu()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=sorted(HYPERPARAMETERS), default="svdlora")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="per device")
    parser.add_argument("--cpu", action="store_true", default=not torch.cuda.is_available())
    parser.add_argument("--resume-check", action="store_true", help="compare an uninterrupted and a resumed run")
    parser.add_argument("--check", action="store_true", help="build the arguments and the trainer inputs only")
    parser.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "loraopt-fsdp2-example"),
                        help="shared by all ranks (checkpoints are written there)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.check:
        with tempfile.TemporaryDirectory() as out:
            training_args = fsdp_arguments(out, args)
            print("fsdp:", training_args.fsdp, training_args.fsdp_config.get("version"), "optimizer:", args.optimizer)
        return

    out = args.output_dir
    trainer = build_trainer(os.path.join(out, "straight"), args)
    trainer.train()
    straight = trained_parameters(trainer)
    rank = int(os.environ.get("RANK", "0"))
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    sharded = [n for n, p in trainer.model.named_parameters() if hasattr(p, "full_tensor")]
    if rank == 0:
        print(f"{args.optimizer}: {type(inner).__name__} trained {args.steps} steps on {len(sharded)} DTensor "
              f"parameters (world size {int(os.environ.get('WORLD_SIZE', '1'))}, accelerate distributed type "
              f"{trainer.accelerator.distributed_type})")
        if not sharded:
            print("note: FSDP was not applied. accelerate enables its FSDP plugin only for accelerator backends "
                  "(CUDA, XPU, NPU, ...); on CPU processes it runs plain data parallelism instead. The FSDP2 path "
                  "of the optimizers themselves is tested on CPU in tests/test_fsdp.py with fully_shard directly.")
    if not args.resume_check:
        return

    half = args.steps // 2
    first = build_trainer(os.path.join(out, "resumed"), args, save_strategy="steps", save_steps=half)
    first.train()  # saves checkpoint-{half} (and checkpoint-{steps})
    second = build_trainer(os.path.join(out, "resumed"), args, save_strategy="steps", save_steps=half)
    second.train(resume_from_checkpoint=os.path.join(out, "resumed", f"checkpoint-{half}"))
    resumed = trained_parameters(second)
    worst = max(float((straight[n] - resumed[n]).abs().max()) for n in straight)
    if rank == 0:
        print(f"{args.optimizer}: resumed at step {half} vs uninterrupted, max |diff| = {worst:.2e}")


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # a clean shutdown of the process group before interpreter teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
