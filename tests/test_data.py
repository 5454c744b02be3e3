"""miarobust/data.py: every data source yields (C, H, W) images in [0, 1] fitted to the model's geometry."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from miarobust.data import DATASETS, FASHION_MNIST_ROOT, Geometry, fit, load_dataset
from miarobust.errors import UserError

GREY28 = Geometry(1, 28, 28)  # vit_fmnist
RGB32 = Geometry(3, 32, 32)  # CIFAR's own
RGB224 = Geometry(3, 224, 224, "bicubic", 0.875)  # DeiT


def check_items(ds, geometry: Geometry, count: int = 4) -> list[int]:
    """The first `count` items have the geometry's shape, float values in [0, 1] and int labels."""
    labels = []
    for i in range(min(count, len(ds))):
        x, y = ds[i]
        assert x.shape == (geometry.channels, geometry.height, geometry.width)
        assert x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert isinstance(y, int)
        labels.append(y)
    return labels


def test_registry_names():
    assert set(DATASETS) == {"embedded", "fashion-mnist", "cifar10", "imagenet", "folder", "synthetic"}


@pytest.mark.parametrize("name", ["embeded", "cifar", "image-net"])
def test_unknown_dataset_suggests_closest(name):
    with pytest.raises(UserError, match="Did you mean"):
        load_dataset(name, GREY28)


def test_unknown_split():
    with pytest.raises(UserError, match="use train or test"):
        load_dataset("synthetic", GREY28, split="val")


# -- embedded ------------------------------------------------------------------------------------------
def test_embedded_native_geometry():
    ds = load_dataset("embedded", GREY28)
    assert len(ds) == 1000 and ds.num_classes == 10
    check_items(ds, GREY28)
    assert np.bincount(ds.labels, minlength=10).tolist() == [100] * 10  # class-balanced subset


def test_embedded_grey_to_rgb_and_resize():
    ds = load_dataset("embedded", RGB32)
    check_items(ds, RGB32)
    x, _ = ds[0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey repeated, not invented colour


def test_embedded_has_no_train_split():
    with pytest.raises(UserError, match="fashion-mnist"):
        load_dataset("embedded", GREY28, split="train")


# -- fashion-mnist -------------------------------------------------------------------------------------
needs_fmnist = pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="Debian's dataset-fashion-mnist is not installed")


@needs_fmnist
def test_fashion_mnist_test_split():
    ds = load_dataset("fashion-mnist", GREY28)
    assert len(ds) == 10_000 and ds.num_classes == 10
    check_items(ds, GREY28)


@needs_fmnist
def test_fashion_mnist_embedded_is_a_subset():
    """The shipped subset holds real Fashion-MNIST test images."""
    full, emb = load_dataset("fashion-mnist", GREY28), load_dataset("embedded", GREY28)
    x = emb[0][0]
    hits = np.flatnonzero((full.images == emb.images[0]).all(axis=(1, 2)))
    assert len(hits) >= 1 and int(full.labels[hits[0]]) == emb[0][1]
    assert torch.equal(full[int(hits[0])][0], x)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", GREY28, root=str(tmp_path))


def test_fashion_mnist_corrupt_idx(tmp_path):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03\x00\x00")  # header cut short
    with pytest.raises(UserError, match="not a readable IDX file"):
        load_dataset("fashion-mnist", GREY28, root=str(tmp_path))


def test_fashion_mnist_from_generated_idx(tmp_path):
    """The IDX reader on files written here (plain, not gzipped): 3 images of 28x28."""
    imgs = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"".join(
        d.to_bytes(4, "big") for d in imgs.shape) + imgs.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([4, 5, 6]))
    ds = load_dataset("fashion-mnist", GREY28, root=str(tmp_path))
    assert check_items(ds, GREY28) == [4, 5, 6]
    assert torch.equal(ds[1][0][0], torch.from_numpy(imgs[1]).float() / 255)


# -- cifar10 -------------------------------------------------------------------------------------------
def test_cifar10_layout_and_values(cifar_root):
    ds = load_dataset("cifar10", RGB32, root=str(cifar_root))
    assert len(ds) == 6 and ds.num_classes == 10 and ds.classes[0] == "airplane"
    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        entry = pickle.load(f)
    assert check_items(ds, RGB32, 6) == entry["labels"]
    # pixel (c, r, k) of image i is data[i, c * 1024 + r * 32 + k] / 255: CHW rows, as in the CIFAR paper
    x = ds[2][0]
    want = torch.from_numpy(entry["data"][2].reshape(3, 32, 32).astype(np.float32)) / 255
    assert torch.equal(x, want)


def test_cifar10_train_split_and_root_itself(cifar_root):
    ds = load_dataset("cifar10", RGB32, root=str(cifar_root / "cifar-10-batches-py"), split="train")
    assert len(ds) == 20
    check_items(ds, RGB32)


def test_cifar10_rgb_to_grey_resized(cifar_root):
    ds = load_dataset("cifar10", GREY28, root=str(cifar_root))
    check_items(ds, GREY28)


def test_cifar10_needs_root(tmp_path):
    with pytest.raises(UserError, match="--data-root is required"):
        load_dataset("cifar10", RGB32)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("cifar10", RGB32, root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="has no test_batch"):
        load_dataset("cifar10", RGB32, root=str(tmp_path))


class MakesMarker:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar10_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [MakesMarker(marker)]}, f)
    with pytest.raises(UserError, match="not a CIFAR-10 batch file"):
        load_dataset("cifar10", RGB32, root=str(tmp_path))
    assert not marker.exists()


# -- imagenet / folder ---------------------------------------------------------------------------------
def test_folder_native_rgb_224(image_root):
    ds = load_dataset("folder", RGB224, root=str(image_root))
    assert len(ds) == 6 and ds.classes == ("cat", "dog")
    assert check_items(ds, RGB224, 6) == [0, 0, 0, 1, 1, 1]


def test_folder_to_grey28(image_root):
    check_items(load_dataset("folder", GREY28, root=str(image_root)), GREY28, 6)


def test_imagenet_prefers_val_subfolder(tmp_path, image_root):
    (tmp_path / "val").symlink_to(image_root, target_is_directory=True)
    (tmp_path / "junk").mkdir()  # would be a class of its own if root itself were used
    ds = load_dataset("imagenet", RGB224, root=str(tmp_path))
    assert ds.classes == ("cat", "dog")
    check_items(ds, RGB224, 2)
    assert load_dataset("imagenet", RGB224, root=str(image_root)).classes == ("cat", "dog")  # no val/: root itself


def test_folder_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(UserError, match="not an image folder"):
        load_dataset("folder", RGB224, root=str(tmp_path))


def test_folder_with_corrupt_png(tmp_path, image_root):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    ds = load_dataset("folder", RGB224, root=str(tmp_path))  # listing succeeds; decoding is lazy
    with pytest.raises(UserError, match=r"cannot read image .*bad\.png.*remove or replace"):
        ds[0]


# -- synthetic -----------------------------------------------------------------------------------------
def test_synthetic_is_reproducible():
    a, b = load_dataset("synthetic", RGB224), load_dataset("synthetic", RGB224)
    assert len(a) == 256
    check_items(a, RGB224)
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == b[5][1]
    assert not torch.equal(a[0][0], load_dataset("synthetic", RGB224, split="train")[0][0])


# -- geometry ------------------------------------------------------------------------------------------
def test_fit_grey_rgb_resize():
    grey = torch.rand(1, 28, 28)
    rgb = fit(grey, RGB32)
    assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[2])
    back = fit(torch.rand(2, 3, 40, 30), GREY28)
    assert back.shape == (2, 1, 28, 28) and 0 <= back.min() and back.max() <= 1
    same = torch.rand(1, 28, 28)
    assert fit(same, GREY28) is same or torch.equal(fit(same, GREY28), same)
    with pytest.raises(UserError, match="channels"):
        fit(torch.rand(2, 8, 8), RGB32)


def test_fit_stays_in_range_for_bicubic_overshoot():
    x = torch.zeros(1, 8, 8)
    x[:, ::2] = 1.0  # stripes: bicubic interpolation overshoots [0, 1] without the clamp
    y = fit(x, Geometry(1, 29, 29, "bicubic"))
    assert 0 <= y.min() and y.max() <= 1


def test_geometry_of_models():
    from miarobust.models import create

    g = Geometry.of(create("vit_fmnist", pretrained=False))
    assert (g.channels, g.height, g.width) == (1, 28, 28)
    g = Geometry.of(create("deit_t", pretrained=False, img_size=32, num_classes=10))
    assert (g.channels, g.height, g.width, g.interpolation) == (3, 32, 32, "bicubic")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_unreadable_root(tmp_path):
    root = tmp_path / "locked"
    root.mkdir()
    root.chmod(0)
    try:
        with pytest.raises(UserError, match="not readable"):
            load_dataset("folder", RGB224, root=str(root))
    finally:
        root.chmod(0o755)


def test_unreadable_root_message(tmp_path, monkeypatch):
    """The permission check, also where the tests run as root (who reads everything)."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="not readable: fix its permissions"):
        load_dataset("folder", RGB224, root=str(tmp_path))


def test_cifar10_without_batches_meta_names_classes_by_number(tmp_path, cifar_root):
    import shutil

    base = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar_root / "cifar-10-batches-py", base)
    (base / "batches.meta").unlink()
    ds = load_dataset("cifar10", RGB32, root=str(tmp_path))
    assert ds.classes == tuple(str(i) for i in range(10)) and len(ds) == 6


def test_folder_keeps_an_empty_class_in_the_class_order(tmp_path, image_root):
    """An empty class folder keeps its index (the model's output index); it used to reject the whole folder."""
    import shutil

    for c in ("cat", "dog"):
        shutil.copytree(image_root / c, tmp_path / c)
    (tmp_path / "cow").mkdir()  # sorts between cat and dog
    ds = load_dataset("folder", RGB224, root=str(tmp_path))
    assert ds.classes == ("cat", "cow", "dog") and ds.num_classes == 3
    assert {ds[i][1] for i in range(len(ds))} == {0, 2}


def test_folder_reads_16_bit_greyscale_on_its_full_range(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    wide = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80)  # up to 62,640 of 65,535
    Image.fromarray(wide).save(tmp_path / "a" / "x.png")
    x, _ = load_dataset("folder", Geometry(1, 28, 28), root=str(tmp_path))[0]
    want = torch.from_numpy(np.round(wide / 65535 * 255) / 255).float()[None]
    assert (x - want).abs().max() < 1e-6 and 0.9 < float(x.max()) < 0.96  # not clipped to white


def test_folder_with_deits_training_augmentation(image_root):
    """augment=True: timm's DeiT training transform (random crops, RandAugment, erasing) in [0, 1]-ish pixels at the
    model's size, different per draw, reproducible from the seeds; array data sets refuse it in one line."""
    import random

    ds = load_dataset("folder", RGB224, root=str(image_root), augment=True)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        draws.append(ds[0][0])
    assert draws[0].shape == (3, 224, 224) and torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    plain = load_dataset("folder", RGB224, root=str(image_root))[0][0]
    assert not torch.equal(draws[0], plain)
    erased = [ds[i % 6][0] for i in range(40)]  # random erasing writes ImageNet-mean + std * N(0, 1), as DeiT has it
    assert min(float(e.min()) for e in erased) >= -2.5 and max(float(e.max()) for e in erased) <= 3.5
    with pytest.raises(UserError, match="--augment"):
        load_dataset("embedded", GREY28, augment=True)
