"""``images``: image classification from a user's own files (nothing is downloaded), with
the ResNet-9 of TRAK/dattri/kronfluence or a small CNN.

The data (``task.data``) is one of

* an ``.npz`` with ``x_train`` ``[N, H, W, C]`` or ``[N, C, H, W]`` (or ``[N, H, W]``; uint8
  in 0..255 or floats in [0, 1]) and ``y_train`` ``[N]`` integer labels, and optionally
  ``x_test``/``y_test`` (the queries are drawn from them); ``x``/``y`` are read as
  ``x_train``/``y_train``;
* a folder of class sub-folders (``<data>/<class>/<image>``, any format Pillow reads), or
  ``<data>/train/<class>/...`` and ``<data>/test/<class>/...``; classes are the sorted
  sub-folder names, labels their positions.

``classes`` keeps some labels and renumbers them in the order given (dattri's CIFAR-2 is
CIFAR-10's cat and dog, ``[3, 5]``); ``n_train`` training and ``n_queries`` query images are
drawn by a permutation seeded by ``split_seed`` (from the test split when there is one, else
from the rest of the pool). Pixels are scaled to [0, 1] and normalised per channel,
(x − mean) / std (dattri: 0.5, 0.5). No augmentation, so every fit is deterministic.
:func:`cifar10_to_npz` converts CIFAR-10's python version ("cifar-10-batches-py") into the
``.npz`` form with numpy alone.

Training, loss (cross entropy), measurement (margin) and retraining are
:class:`~tasks.supervised.SupervisedTask`'s: ``small_cnn`` retrains as a vectorised ensemble,
``resnet9`` (batch norm) one model at a time; either way LDS shards run as jobs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tasks.convnets import resnet9, small_cnn
from tasks.supervised import SupervisedTask

MODELS = ("resnet9", "small_cnn")
LAYOUTS = ("auto", "nhwc", "nchw")
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _as_nchw(x: np.ndarray, layout: str, where: str) -> np.ndarray:
    """``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` -> ``[N, C, H, W]``."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{where} must have shape [N, H, W], [N, H, W, C] or [N, C, H, W], got "
                         f"{x.shape}; reshape the array.")
    channels_last = x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
    if layout == "nhwc" or (layout == "auto" and channels_last):
        return x.transpose(0, 3, 1, 2)
    return x


def _read_npz(path: Path, layout: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with np.load(path) as npz:
        keys = set(npz.files)
        out = {}
        for split, (xk, yk) in {"train": ("x_train", "y_train"), "test": ("x_test", "y_test"),
                                "pool": ("x", "y")}.items():
            if xk in keys and yk in keys:
                out[split] = (_as_nchw(npz[xk], layout, f"{path}:{xk}"), npz[yk])
    if "train" not in out and "pool" in out:
        out["train"] = out.pop("pool")
    if "train" not in out:
        raise ValueError(f"{path} holds {sorted(keys)}, but task.data needs x_train and "
                         "y_train (and optionally x_test, y_test), or x and y.")
    return out


def _read_folder(root: Path, grayscale: bool, size: int | None) -> tuple[
        dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    from PIL import Image

    splits = {"train": root / "train", "test": root / "test"} if (root / "train").is_dir() \
        else {"train": root}
    names = sorted(p.name for p in splits["train"].iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"{splits['train']} has no class sub-folders; task.data must be an "
                         ".npz or a folder of <class>/<image> files.")
    out = {}
    for split, folder in splits.items():
        images, labels = [], []
        for label, name in enumerate(names):
            for file in sorted((folder / name).glob("*")):
                if file.suffix.lower() not in SUFFIXES:
                    continue
                with Image.open(file) as image:
                    image = image.convert("L" if grayscale else "RGB")
                    if size:
                        image = image.resize((size, size), Image.Resampling.BILINEAR)
                    images.append(np.asarray(image))
                labels.append(label)
        shapes = {a.shape for a in images}
        if len(shapes) > 1:
            raise ValueError(f"the images under {folder} have different sizes {sorted(shapes)}; "
                             "set task.image_size to resize them.")
        if images:
            out[split] = (_as_nchw(np.stack(images), "nhwc", str(folder)), np.asarray(labels))
    return out, names


def cifar10_to_npz(source: str | Path, target: str | Path) -> Path:
    """Writes CIFAR-10's python version (the folder ``cifar-10-batches-py`` with
    ``data_batch_1..5`` and ``test_batch``) as an ``.npz`` with ``x_train [50000, 32, 32, 3]``
    uint8, ``y_train``, ``x_test [10000, 32, 32, 3]``, ``y_test``; numpy and pickle only."""
    source, target = Path(source), Path(target)

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(source / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = batch("test_batch")
    np.savez(target, x_train=np.concatenate([x for x, _ in train]),
             y_train=np.concatenate([y for _, y in train]), x_test=x_test, y_test=y_test)
    return target


class Images(SupervisedTask):
    """Image classification from local files (see module docstring).

    Args:
        data: an ``.npz`` file or a folder of class sub-folders.
        n_train: training images (None: the whole training split).
        n_queries: query images (None: the whole test split).
        classes: labels to keep, renumbered 0, 1, ... in this order (None: all).
        model: ``resnet9`` or ``small_cnn``.
        width: ResNet-9's base width w (64: the original).
        channels: ``small_cnn``'s convolution widths.
        mean, std: per-channel normalisation (one number or one per channel).
        layout: ``auto``, ``nhwc`` or ``nchw`` (of an ``.npz``'s arrays).
        grayscale: read a folder's images as one channel (else RGB).
        image_size: resize a folder's images to this square size (None: keep; all equal).
        precision: Lightning's training precision (``32-true``; ``bf16-mixed`` on a GPU).
        **task: ``l2``, ``batch_size``, ``epochs``, ``optim``, ``checkpoints``
            (:class:`~tasks.supervised.SupervisedTask`), ``split_seed``, ground-truth settings,
            ``device`` (:class:`~tasks.base.Task`).
    """

    VERSION = 1

    def __init__(self, data: str, n_train: int | None = 5000, n_queries: int | None = 500,
                 classes: list[int] | None = None, model: str = "resnet9", width: int = 64,
                 channels: list[int] | tuple[int, ...] = (32, 64), mean: float | list = 0.5,
                 std: float | list = 0.5, layout: str = "auto", grayscale: bool = False,
                 image_size: int | None = None, precision: str = "32-true", **task):
        super().__init__(**task)
        if model not in MODELS or layout not in LAYOUTS:
            raise ValueError(f"task.model must be one of {MODELS} and task.layout one of "
                             f"{LAYOUTS}, got {model!r} and {layout!r}")
        self.model_kind, self.width = model, int(width)
        self.channels = [int(c) for c in channels]
        self.precision = str(precision)
        path = Path(data).expanduser()
        if path.is_dir():
            splits, _ = _read_folder(path, bool(grayscale), image_size)
        elif path.suffix == ".npz" and path.is_file():
            splits = _read_npz(path, layout)
        else:
            raise ValueError(f"task.data={data!r} is neither an .npz file nor a folder of class "
                             "sub-folders; point it at your images (nothing is downloaded).")
        self.train_set, self.query_set = self._select(splits, classes, n_train, n_queries,
                                                      mean, std)
        x = self.train_set.tensors[0]
        self.in_channels, self.size = x.shape[1], (x.shape[2], x.shape[3])
        self.n_classes = len(classes) if classes else int(self._labels_max) + 1

    def _select(self, splits: dict, classes: list[int] | None, n_train: int | None,
                n_queries: int | None, mean, std) -> tuple[TensorDataset, TensorDataset]:
        """Class filter, seeded subsets, scaling and normalisation."""
        def keep(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
            y = np.asarray(y).astype(np.int64).reshape(-1)
            if classes:
                mask = np.isin(y, np.asarray(classes, dtype=np.int64))
                lookup = {int(c): i for i, c in enumerate(classes)}
                x, y = x[mask], np.asarray([lookup[int(v)] for v in y[mask]], dtype=np.int64)
            return torch.as_tensor(np.ascontiguousarray(x)), torch.as_tensor(y)

        gen = torch.Generator().manual_seed(self.split_seed)
        x, y = keep(*splits["train"])
        order = torch.randperm(len(y), generator=gen)
        n_train = len(y) if n_train is None else int(n_train)
        train = order[:n_train]
        if "test" in splits:
            xq, yq = keep(*splits["test"])
            pool = torch.randperm(len(yq), generator=gen)
        else:
            xq, yq, pool = x, y, order[n_train:]
        queries = pool[: len(pool) if n_queries is None else int(n_queries)]
        if len(train) < n_train or len(queries) < (n_queries or 1):
            raise ValueError(f"task.n_train={n_train} and task.n_queries={n_queries} ask for more "
                             f"images than the data holds ({len(y)} training images of the kept "
                             "classes, and the test split or the rest of the pool for queries).")
        self._labels_max = int(torch.cat([y, yq]).max())

        def scaled(images: Tensor) -> Tensor:
            out = images.to(torch.float32)
            if not images.is_floating_point():
                out = out / 255.0
            m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
            s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
            return ((out - m) / s).to(self.dtype)

        return (TensorDataset(scaled(x[train]), y[train]),
                TensorDataset(scaled(xq[queries]), yq[queries]))

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if self.model_kind == "resnet9":
                return resnet9(self.in_channels, self.n_classes, self.width).to(self.dtype)
            return small_cnn(self.in_channels, self.size, self.channels,
                             self.n_classes).to(self.dtype)
