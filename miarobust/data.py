"""Evaluation and training data by name; every data set yields (image in [0, 1], shape (C, H, W), label).

Models own their normalisation, so images stay in pixel space here. Each data set is sized to the model
through `Geometry` (channels, height, width, interpolation, crop), taken from the model's timm data config.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from miarobust.errors import UserError, unknown_name

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
EMBEDDED_FILE = "fmnist_test_1000.npz"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class Geometry:
    """What a model takes: channels, height, width, and how to get there (from timm's data config)."""

    channels: int
    height: int
    width: int
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def of(cls, model: torch.nn.Module) -> Geometry:
        """The geometry in a timm model's pretrained_cfg."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        c, h, w = cfg.get("input_size", (3, 224, 224))
        return cls(c, h, w, cfg.get("interpolation", "bilinear") or "bilinear", cfg.get("crop_pct", 1.0) or 1.0)

    @classmethod
    def of_module(cls, model: torch.nn.Module, input_size: Sequence[int] | None = None) -> Geometry:
        """`input_size` (C, H, W) if given, else what the module's timm pretrained_cfg says; a UserError if neither."""
        if input_size is not None:
            c, h, w = (int(v) for v in input_size)
            return cls(c, h, w)
        if "input_size" not in (getattr(model, "pretrained_cfg", None) or {}):
            raise UserError(f"{type(model).__name__} has no timm pretrained_cfg saying what it takes: pass "
                            "input_size=(C, H, W).")
        return cls.of(model)


def fit(x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Resize (C, H, W) or (B, C, H, W) images in [0, 1] to the geometry; grey <-> RGB by repeat / mean."""
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    if x.shape[1] != geometry.channels:
        if x.shape[1] == 1:
            x = x.expand(-1, geometry.channels, -1, -1)
        elif geometry.channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise UserError(f"images have {x.shape[1]} channels but the model takes {geometry.channels}.")
    if x.shape[-2:] != (geometry.height, geometry.width):
        mode = "bicubic" if geometry.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(geometry.height, geometry.width), mode=mode, antialias=True, align_corners=False)
        x = x.clamp(0, 1)
    return x[0] if single else x


class TensorImages(Dataset):
    """Images held as a uint8 array (N, H, W) or (N, H, W, C) with int labels, fitted on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, geometry: Geometry, classes: tuple[str, ...]):
        if len(images) != len(labels):
            raise UserError(f"data has {len(images)} images but {len(labels)} labels: the files are inconsistent.")
        self.images, self.labels, self.geometry, self.classes = images, labels.astype(np.int64), geometry, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.images[i])).float().div_(255)
        img = img.unsqueeze(0) if img.dim() == 2 else img.permute(2, 0, 1)
        return fit(img, self.geometry), int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not), the format of (Fashion-)MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims).copy()  # writable: torch warns on every image read from a read-only buffer
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise UserError(f"{path} is not a readable IDX file ({e}); reinstall dataset-fashion-mnist or fix --data-root.") from e


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root} has no {stem}[.gz]: install Debian's dataset-fashion-mnist or point --data-root at the files.")


def _check_root(root: str | os.PathLike[str] | None, what: str) -> Path:
    if root is None:
        raise UserError(f"--data-root is required for {what}.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"data root {path} does not exist or is not a folder: pass --data-root with the {what} files.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"data root {path} is not readable: fix its permissions or pass another --data-root.")
    return path


def fashion_mnist(root: str | None, split: str, geometry: Geometry) -> TensorImages:
    """Fashion-MNIST (Xiao et al. 2017) from the IDX files (Debian's dataset-fashion-mnist by default)."""
    path = _check_root(root or FASHION_MNIST_ROOT, "Fashion-MNIST")
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find(path, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(path, f"{prefix}-labels-idx1-ubyte"))
    return TensorImages(images, labels, geometry, FASHION_MNIST_CLASSES)


def embedded(root: str | None, split: str, geometry: Geometry) -> TensorImages:
    """The class-balanced 1,000-image Fashion-MNIST test subset shipped in the package."""
    if split != "test":
        raise UserError("the embedded data set has only a test split: use --data fashion-mnist to train.")
    with resources.as_file(resources.files("miarobust") / "checkpoints" / EMBEDDED_FILE) as f:
        with np.load(f) as z:
            return TensorImages(z["images"], z["labels"], geometry, FASHION_MNIST_CLASSES)


CIFAR10_DIR = "cifar-10-batches-py"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only, so a data-set file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a data file has no need of")
        return super().find_class(module, name)


def _read_cifar(path: Path) -> dict:
    """One file of CIFAR-10's python version (a pickled dict), without executing code."""
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}: unpack CIFAR-10's python version (cifar-10-python.tar.gz, "
                        f"https://www.cs.toronto.edu/~kriz/cifar.html) under --data-root.")
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
        if not isinstance(entry, dict):
            raise ValueError("not a dict")
        return entry
    except Exception as e:  # noqa: BLE001  (any parse failure of a foreign file is the user's file problem)
        raise UserError(f"{path} is not a CIFAR-10 batch file ({e}): unpack cifar-10-python.tar.gz again.") from e


def cifar10(root: str | None, split: str, geometry: Geometry) -> TensorImages:
    """CIFAR-10 in torchvision's layout (cifar-10-batches-py) under --data-root; never downloads."""
    path = _check_root(root, "CIFAR-10")
    base = path / CIFAR10_DIR if (path / CIFAR10_DIR).is_dir() else path
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        entry = _read_cifar(base / name)
        try:
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in entry["labels"])
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{base / name} is not a CIFAR-10 batch file (no 32x32 RGB 'data' and 'labels': {e}).") from e
    meta = _read_cifar(base / "batches.meta") if (base / "batches.meta").is_file() else {}
    classes = tuple(meta.get("label_names", ())) or tuple(str(i) for i in range(10))
    data = np.concatenate(images).transpose(0, 2, 3, 1)  # (N, 32, 32, 3), as torchvision holds it
    return TensorImages(data, np.asarray(labels), geometry, classes)


def load_image(path: str) -> Any:
    """An image file as an RGB PIL image; 16- and 32-bit integer greyscale scaled from 0..65535 (PIL's own
    conversion clips them at 255: white)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(img, dtype=np.float64) / 65535
        img = Image.fromarray(np.clip(np.round(wide * 255), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


#: DeiT's training augmentation in timm's terms: RandAugment (magnitude 9, noise 0.5, increasing), random resized
#: crops, horizontal flips, random erasing of a quarter of the images (per-pixel noise)
DEIT_AUGMENT = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel", "re_count": 1}


class CheckedImageFolder(Dataset):
    """torchvision's ImageFolder that reports an unreadable image as a UserError naming the file."""

    def __init__(self, root: Path, geometry: Geometry, augment: bool = False):
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        size = (geometry.channels, geometry.height, geometry.width)
        if augment:  # DeiT's training augmentation, as timm builds it (mixup and cutmix, batch-level, left out)
            from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
            from torchvision import transforms

            # built with ImageNet's mean and std, as DeiT has it (RandAugment fills with the mean colour, random erasing
            # writes N(0, 1) noise in normalised units), then mapped back to pixels: the model normalises
            mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
            transform = transforms.Compose([
                create_transform(input_size=size, is_training=True, interpolation="bicubic", **DEIT_AUGMENT,
                                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
                transforms.Lambda(lambda t: t * std + mean),
            ])
        else:
            transform = create_transform(
                input_size=size, is_training=False, interpolation=geometry.interpolation, crop_pct=geometry.crop_pct,
                mean=(0.0,) * 3, std=(1.0,) * 3,  # keep [0, 1]: the model normalises
            )
        try:  # an empty class folder keeps its place in the class order (its index is the model's output index)
            self.folder = ImageFolder(str(root), transform=transform, loader=load_image, allow_empty=True)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"{root} is not an image folder (one sub-folder of images per class): {e}") from e
        if not len(self.folder):
            raise UserError(f"{root} is not an image folder: its class folders ({', '.join(self.folder.classes[:5])}"
                            f"{', ...' if len(self.folder.classes) > 5 else ''}) hold no images; point --data-root at "
                            "the folder of class folders.")
        self.geometry, self.classes = geometry, tuple(self.folder.classes)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.folder.samples[i][0]
        try:
            x, y = self.folder[i]
        except (OSError, ValueError) as e:
            from PIL import UnidentifiedImageError

            why = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
            raise UserError(f"cannot read image {path} ({why}): remove or replace the file.") from e
        return fit(x, self.geometry), y

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def folder(root: str | None, split: str, geometry: Geometry, augment: bool = False) -> CheckedImageFolder:
    """Any ImageFolder (root/<class>/<image>), with the model's eval transform from timm's data config (or, with
    `augment`, DeiT's training augmentation)."""
    return CheckedImageFolder(_check_root(root, "image folder"), geometry, augment)


def imagenet(root: str | None, split: str, geometry: Geometry, augment: bool = False) -> CheckedImageFolder:
    """ImageNet as an ImageFolder: root/val (or root/train) if present, else root itself."""
    path = _check_root(root, "ImageNet")
    sub = path / ("train" if split == "train" else "val")
    return CheckedImageFolder(sub if sub.is_dir() else path, geometry, augment)


class Synthetic(Dataset):
    """Random images with random labels, reproducible from a seed: for smoke runs, never for numbers."""

    def __init__(self, geometry: Geometry, n: int = 256, num_classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, geometry.channels, geometry.height, geometry.width, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        self.classes = tuple(str(i) for i in range(num_classes))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def synthetic(root: str | None, split: str, geometry: Geometry) -> Synthetic:
    """Random data at the model's geometry."""
    return Synthetic(geometry, seed=0 if split == "test" else 1)


#: Data sets whose labels are a fixed list of classes: a model must output exactly that many to be scored on them.
FIXED_LABELS = ("embedded", "fashion-mnist", "cifar10", "imagenet")

DATASETS: dict[str, Callable[[str | None, str, Geometry], Dataset]] = {
    "embedded": embedded,
    "fashion-mnist": fashion_mnist,
    "cifar10": cifar10,
    "imagenet": imagenet,
    "folder": folder,
    "synthetic": synthetic,
}


def load_dataset(name: str, geometry: Geometry, root: str | None = None, split: str = "test",
                 augment: bool = False) -> Dataset:
    """The data set `name` (a key of DATASETS), fitted to `geometry`; `augment`: DeiT's training augmentation, for
    the image-folder data sets."""
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    if split not in ("train", "test"):
        raise UserError(f"unknown split '{split}': use train or test.")
    if augment:
        if name not in ("folder", "imagenet"):
            raise UserError(f"--timm-augment is DeiT's augmentation of image files (--data folder or imagenet); "
                            f"{name} holds small arrays: use --augment (shifts and flips).")
        return DATASETS[name](root, split, geometry, augment=True)
    return DATASETS[name](root, split, geometry)
