"""Reading images: files of any format Pillow reads, and the data sets users have, as uint8
tensors (N, C, S, S) with their class names.

Files:     any mode (grey, RGB, palette, 16-bit, float) becomes `channels` channels of 8 bits;
           another shape becomes square by squashing, cropping the centre or padding
Limits:    an image is decoded only if its header declares at most MAX_PIXELS pixels
           (89,478,485, Pillow's own MAX_IMAGE_PIXELS: about 9,460 x 9,460); Pillow's
           decompression-bomb warning and error become that DataError
Data sets: an .npz with x_train, y_train, x_test, y_test; a folder with one sub-folder per class
           (and optionally train/ and test/ above them); a CSV of path,label; scikit-learn's
           8x8 digits; MNIST. Without a test split, a stratified val_fraction is held out with
           split_seed (scikit-learn's train_test_split).
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..data import find_data, listed_file, read_each
from ..errors import DataError

if TYPE_CHECKING:
    from .vision import VisionConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm")
BUILTIN = {"digits": "scikit-learn's 8x8 digits", "mnist": "mnist/mnist.npz"}
MAX_PIXELS = 89_478_485  # width x height an image may declare (Pillow's MAX_IMAGE_PIXELS)


def _too_large(what, pixels: str) -> DataError:
    return DataError(f"{what} is {pixels}, more than the {MAX_PIXELS:,} pixels this decodes; "
                     "give a smaller image (scaled to at most 9,000 pixels a side)")


def read_image(source: Path | bytes, channels: int, size: int, fit: str = "squash"
               ) -> torch.Tensor:
    """Any image Pillow reads, a file or its bytes -> uint8 (channels, size, size); DataError
    if unreadable, or if its header declares more than MAX_PIXELS (checked before decoding)."""
    from PIL import Image, ImageOps

    upload = isinstance(source, (bytes, bytearray))
    what = "the upload" if upload else source
    try:
        with warnings.catch_warnings():  # over Pillow's limit: refused below, not warned of
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if upload else source)
        with im:
            if im.width * im.height > MAX_PIXELS:  # the header's size, before decoding
                raise _too_large(what, f"{im.width} x {im.height} pixels")
            im.load()  # decode now: a truncated file fails here, not later
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey
                a = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.uint8(255 * a / max(a.max(), 1.0)))
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                resample = Image.Resampling.BILINEAR
                if fit == "crop":
                    im = ImageOps.fit(im, (size, size), resample)
                elif fit == "pad":
                    im = ImageOps.pad(im, (size, size), resample, color=0)
                else:
                    im = im.resize((size, size), resample)
            a = np.array(im, dtype=np.uint8)
    except Image.DecompressionBombError as e:  # over twice Pillow's limit, or a frame larger
        raise _too_large(what, str(e).partition("(")[2].partition(")")[0] or "too large") \
            from None  # than its header said
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{what} is not a readable image ({str(e).rstrip('.')}); give a "
                        "PNG, JPEG, BMP, GIF, WebP or TIFF file") from None
    t = torch.from_numpy(a)
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(root: Path) -> dict[str, list[Path]]:
    """{class name: image files} for each sub-folder of root that holds images."""
    out = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _image_files(sub)
        if files:
            out[sub.name] = files
    return out


def _read_listed(items: list[tuple[Path, str]], cfg: VisionConfig, source: Path):
    """Read (path, label) pairs; unreadable files are reported and skipped."""
    images, kept = read_each(items, lambda item: read_image(item[0], cfg.channels,
                                                            cfg.image_size, cfg.fit),
                             f"{source.name}'s image", unit="image")
    return torch.stack(images), [label for _, label in kept]


def _stratified(labels: list[str], cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = {k: labels.count(k) for k in set(labels)}
    if min(counts.values()) < 2:
        rare = min(counts, key=counts.get)
        raise DataError(f"class {rare!r} has only {counts[rare]} image; each class needs at "
                        "least 2 so that one can be held out for testing")
    return train_test_split(idx, test_size=cfg.val_fraction, random_state=cfg.split_seed,
                            stratify=labels)


def _split_pairs(x: torch.Tensor, labels: list[str], cfg: VisionConfig) -> dict:
    train, test = _stratified(labels, cfg)
    return {"train": (x[train], [labels[i] for i in train]),
            "test": (x[test], [labels[i] for i in test])}


def _from_arrays(x: np.ndarray, cfg: VisionConfig, source: str) -> torch.Tensor:
    """An array of images (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or float in [0, 1]
    -> uint8 (N, channels, image_size, image_size)."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # channels last (Keras) -> channels first
    elif not (x.ndim == 4 and x.shape[1] in (1, 3, 4)):
        raise DataError(f"{source}: images have shape {x.shape}; expected (N, H, W), "
                        "(N, H, W, C) or (N, C, H, W) with C = 1, 3 or 4")
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x)).float()
    elif np.issubdtype(x.dtype, np.floating) and x.size and x.max() <= 1.0:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) * 255
    elif np.issubdtype(x.dtype, np.number):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        top = float(t.max()) if t.numel() else 1.0
        if top > 255:
            t = t * (255 / top)
    else:
        raise DataError(f"{source}: images have dtype {x.dtype}; expected numbers")
    t = t[:, :3]
    if t.size(1) == 3 and cfg.channels == 1:  # ITU-R 601 luma, as Pillow's convert("L")
        t = (t * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    elif t.size(1) == 1 and cfg.channels == 3:
        t = t.expand(-1, 3, -1, -1)
    if t.shape[-2:] != (cfg.image_size, cfg.image_size):
        t = F.interpolate(t, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8)


def _label_names(y: np.ndarray) -> list[str]:
    return [str(int(v)) if np.issubdtype(type(v), np.integer) else str(v) for v in y]


def _load_npz(path: Path, cfg: VisionConfig) -> dict:
    try:
        npz = np.load(path, allow_pickle=False)
        keys = set(npz.files)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npz file ({e})") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in keys]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; an image .npz needs x_train, "
                        f"y_train, x_test and y_test (it has: {', '.join(sorted(keys)) or 'none'})")
    splits = {}
    for split in ("train", "test"):
        x, y = npz[f"x_{split}"], npz[f"y_{split}"].reshape(-1)
        if len(x) != len(y):
            raise DataError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} "
                            "labels; they must be the same length")
        if len(x) == 0:
            raise DataError(f"{path}: x_{split} is empty; give at least one image")
        splits[split] = (_from_arrays(x, cfg, f"{path}:x_{split}"), _label_names(y))
    return splits


def _load_digits(cfg: VisionConfig) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1797 images 8x8, values 0..16
    x = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return _split_pairs(_from_arrays(x, cfg, "digits"), _label_names(digits.target), cfg)


def _load_folder(root: Path, cfg: VisionConfig, split: bool = True) -> dict:
    parts = {s: root / s for s in ("train", "test", "val") if (root / s).is_dir()}
    test_dir = parts.get("test", parts.get("val"))
    if "train" in parts and test_dir is not None:  # the data's own split
        if not split:
            return {"test": _folder_pairs(test_dir, cfg)}
        return {"train": _folder_pairs(parts["train"], cfg),
                "test": _folder_pairs(test_dir, cfg)}
    x, labels = _folder_pairs(root, cfg)
    return _split_pairs(x, labels, cfg) if split else {"test": (x, labels)}


def _folder_pairs(root: Path, cfg: VisionConfig):
    classes = _class_folders(root)
    if not classes:
        raise DataError(f"{root} has no class sub-folders with images; put the images of "
                        f"each class in {root}/<class name>/ (PNG, JPEG, ...)")
    items = [(p, name) for name, files in classes.items() for p in files]
    return _read_listed(items, cfg, root)


def _load_csv(path: Path, cfg: VisionConfig, split: bool = True) -> dict:
    try:
        rows = [r for r in csv.reader(path.read_text(encoding="utf-8").splitlines()) if r]
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 CSV; give lines of path,label") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows or any(len(r) < 2 for r in rows):
        raise DataError(f"{path} must hold lines of path,label (one image each)")
    items = [(listed_file(path, r[0], "image"), r[1].strip()) for r in rows]
    x, labels = _read_listed(items, cfg, path)
    return _split_pairs(x, labels, cfg) if split else {"test": (x, labels)}


def load_image_data(cfg: VisionConfig, path: Path | None, split: bool = True) -> dict:
    """{"train": (uint8 images, label names), "test": (...)} from a built-in data set, an .npz,
    a folder of class folders (with train/ and test/ inside, or split here) or a CSV.
    split=False: only {"test": ...}, all images of a folder or CSV (for evaluating on them)."""
    if path is None and cfg.data == "digits":
        return _load_digits(cfg)
    if path is None:
        path = find_data(BUILTIN.get(cfg.data, cfg.data))
    if path.is_dir():
        if not any(path.iterdir()):
            raise DataError(f"{path} is empty; put the images of each class in "
                            f"{path}/<class name>/")
        return _load_folder(path, cfg, split)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, cfg)
    if suffix in (".csv", ".txt"):
        return _load_csv(path, cfg, split)
    raise DataError(f"{path}: unknown image data; give a .npz (x_train, y_train, x_test, "
                    "y_test), a folder of class folders, or a CSV of path,label")

