"""``images``: reading a user's files (``.npz`` in either layout, a folder of class
sub-folders, CIFAR-10's python batches), class selection and seeded subsets, and end-to-end
runs on generated images with ResNet-9 and the small CNN, LDS computed in shards."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from bench.cli import run
from estimators.gradients import GradientEngine
from tasks.images import Images, cifar10_to_npz
from tests.helpers import TINY_IMAGES


def arrays(n: int = 30, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % 3


def test_npz_layouts_scaling_and_normalisation(tmp_path):
    x, y = arrays()
    np.savez(tmp_path / "nhwc.npz", x=x, y=y)
    np.savez(tmp_path / "nchw.npz", x_train=x.transpose(0, 3, 1, 2), y_train=y)
    a = Images(str(tmp_path / "nhwc.npz"), n_train=20, n_queries=10, model="small_cnn")
    b = Images(str(tmp_path / "nchw.npz"), n_train=20, n_queries=10, model="small_cnn")
    for task in (a, b):
        assert task.train_set.tensors[0].shape == (20, 3, 16, 16) and task.n_classes == 3
    torch.testing.assert_close(a.train_set.tensors[0], b.train_set.tensors[0])
    first = int(torch.randperm(30, generator=torch.Generator().manual_seed(0))[0])
    expected = (torch.tensor(x[first]).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(a.train_set.tensors[0][0], expected)
    # no test split: queries are the rest of the pool, disjoint from the training images
    assert len(a.query_set) == 10
    assert not set(a.train_set.tensors[0].flatten(1).sum(1).tolist()) & set(
        a.query_set.tensors[0].flatten(1).sum(1).tolist())


def test_classes_are_kept_and_renumbered(tmp_path):
    x, y = arrays(60)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:12], y_test=y[:12])
    task = Images(str(tmp_path / "d.npz"), n_train=30, n_queries=6, classes=[2, 0],
                  model="small_cnn")
    labels = task.train_set.tensors[1]
    assert task.n_classes == 2 and set(labels.tolist()) == {0, 1}
    kept = x[y == 2]  # label 2 became 0
    first = task.train_set.tensors[0][labels == 0][0]
    assert any(torch.allclose(first, (torch.tensor(k).permute(2, 0, 1).float() / 255 - .5) / .5)
               for k in kept)
    with pytest.raises(ValueError, match="ask for more"):
        Images(str(tmp_path / "d.npz"), n_train=50, n_queries=6, classes=[2, 0])


def test_a_folder_of_class_folders(tmp_path):
    from PIL import Image

    x, y = arrays(24, size=12)
    for split, rows in (("train", range(18)), ("test", range(18, 24))):
        for i in rows:
            folder = tmp_path / "imgs" / split / ["cat", "dog", "eel"][y[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(folder / f"{i}.png")
    (tmp_path / "imgs" / "train" / "cat" / "notes.txt").write_text("not an image")
    task = Images(str(tmp_path / "imgs"), n_train=18, n_queries=6, model="small_cnn")
    assert task.train_set.tensors[0].shape == (18, 3, 12, 12) and len(task.query_set) == 6
    sums = sorted(task.query_set.tensors[0].flatten(1).sum(1).tolist())
    expected = sorted(((torch.tensor(x[18:]).float() / 255 - .5) / .5).flatten(1).sum(1).tolist())
    np.testing.assert_allclose(sums, expected, rtol=1e-5)
    gray = Images(str(tmp_path / "imgs"), n_train=6, n_queries=2, model="small_cnn",
                  grayscale=True, image_size=8)
    assert gray.train_set.tensors[0].shape == (6, 1, 8, 8)
    Image.fromarray(x[0][:6]).save(tmp_path / "imgs" / "train" / "dog" / "odd.png")
    with pytest.raises(ValueError, match="task.image_size"):
        Images(str(tmp_path / "imgs"), n_train=6, n_queries=2)


def test_bad_data_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="nothing is downloaded"):
        Images(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="needs x_train and y_train"):
        Images(str(tmp_path / "wrong.npz"))


def test_cifar10_python_batches_convert_to_npz(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "cifar-10-batches-py"
    source.mkdir()
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 4).tolist()}
        with open(source / name, "wb") as f:
            pickle.dump(batches[name], f)
    out = cifar10_to_npz(source, tmp_path / "cifar10.npz")
    with np.load(out) as npz:
        assert npz["x_train"].shape == (20, 32, 32, 3) and npz["x_test"].shape == (4, 32, 32, 3)
        # CIFAR rows are channel-major: red plane, green plane, blue plane
        np.testing.assert_array_equal(npz["x_train"][0, 0, 1], batches["data_batch_1"][b"data"][
            0, [1, 1024 + 1, 2048 + 1]])
        assert npz["y_test"].tolist() == batches["test_batch"][b"labels"]
    task = Images(str(out), n_train=20, n_queries=4, model="small_cnn")
    assert task.size == (32, 32) and task.in_channels == 3


def test_resnet9_is_the_reference_architecture():
    """TRAK's/kronfluence's ResNet-9: 8 convolutions without bias and a bias-free linear
    head are tracked (2,271,296 parameters for 3 classes); the 8 batch norms (2,688) are not,
    and keep running statistics, so retraining is not vectorised."""
    task = Images(str(TINY_IMAGES), n_train=12, n_queries=4)
    model = task.build_model(0)
    engine = GradientEngine(model)
    assert [layer.is_conv2d for layer in engine.layers] == [True] * 8 + [False]
    assert not any(layer.has_bias for layer in engine.layers)
    norms = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                for p in m.parameters())
    assert (engine.num_params, norms) == (2_271_296, 2_688)
    assert engine.num_params + norms == sum(p.numel() for p in model.parameters())
    assert model(task.train_set.tensors[0][:2]).shape == (2, 3)
    assert not task.vectorisable(model)


@pytest.mark.parametrize("model", ["small_cnn", "resnet9"])
def test_end_to_end_on_generated_images_with_sharded_lds(make_cfg, model):
    """Two ``stage=ground_truth`` shards as two jobs would compute them, then the run reads
    them (``on_missing=error``: nothing is recomputed) and attributes through the
    convolutions with EK-FAC: LDS with its noise ceiling."""
    common = [f"task.model={model}", "task.width=8", "estimator=ekfac", "task.lds.subsets=6",
              "task.lds.seeds=2"]
    for shard in (0, 1):
        out = run(make_cfg("images", *common, "stage=ground_truth", "ground_truth.num_shards=2",
                           f"ground_truth.shard={shard}"))
        assert out["stage"] == "ground_truth" and len(out["shards"]) == 1
    record = run(make_cfg("images", *common, "ground_truth.num_shards=2",
                          "ground_truth.on_missing=error"))
    assert -1 <= record["lds"] <= 1 and record["lds_ceiling"] is not None
    assert (record["task"], record["estimator"]) == ("images", "ekfac")
