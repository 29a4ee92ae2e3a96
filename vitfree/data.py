"""Image classification data for fine-tuning: built-in offline sets and image folders.

``build_dataset(name_or_path, split)`` returns a :class:`torch.utils.data.Dataset` of
``(PIL.Image (RGB), int label)`` pairs with ``.classes`` (class names, index = label):

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upsampled to
  ``image_size`` (default 28); split per class into train/val/test (70/15/15) with a fixed
  seed, so the split never changes.
* ``fashion_mnist``: Zalando's Fashion-MNIST (28x28, 10 classes) from Debian's
  ``dataset-fashion-mnist`` package; ``train`` is the first 55,000 training images, ``val``
  the last 5,000 (a fixed validation split), ``test`` the official 10,000 test images.
* a folder ``DATA/`` with ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*`` (``test``
  optional); class names are the sub-folder names, sorted.

Unreadable images: every image file of a folder is opened once when the data set is built
(header check, ``verify=True``); unreadable files are left out with one warning that lists them
all, or, with ``strict=True``, reported together in one error before any training starts.  A
file that still fails to decode later (truncated data past the header, or changed on disk
mid-run) is skipped with a warning that names it, and the next readable sample takes its place,
so a long run is not lost to one bad file.
"""
from __future__ import annotations

import gzip
import logging
import os
import random
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


__all__ = [
    'BUILTIN_DATASETS', 'IMG_EXTENSIONS', 'DataError', 'ArrayImageDataset', 'ImageFolderDataset',
    'TransformDataset', 'build_dataset', 'load_digits', 'load_fashion_mnist', 'fashion_mnist_dir',
    'find_unreadable_images', 'list_image_files',
]

_logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ('digits', 'fashion_mnist')
SPLITS = ('train', 'val', 'test')
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_INSTALL = 'sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                         'Bag', 'Ankle boot')
FASHION_MNIST_TRAIN = 55000  # the last 5,000 training images are the fixed validation split
_SPLIT_SEED = 20240601  # fixed: the digits split must never change between versions


class DataError(ValueError):
    """A data set name, folder or file cannot be used; the message names it."""


# ---- in-memory arrays (the built-in sets) ----------------------------------------------------
class ArrayImageDataset(Dataset):
    """Grey-level images held in a ``uint8`` array ``(N, H, W)`` with integer labels.

    Items are ``(PIL.Image in RGB, label)``; images are resized to ``image_size`` when given.
    """

    def __init__(
            self,
            images: np.ndarray,
            labels: np.ndarray,
            classes: Sequence[str],
            image_size: Optional[int] = None,
            transform: Optional[Callable] = None,
            name: str = 'array',
    ) -> None:
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f'{name}: images must be a uint8 array (N, H, W), got {images.dtype} {images.shape}')
        if len(images) != len(labels):
            raise DataError(f'{name}: {len(images)} images but {len(labels)} labels')
        self.images = images
        self.targets = [int(t) for t in labels]
        self.classes = list(classes)
        self.image_size = image_size
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        img = Image.fromarray(self.images[index], mode='L')
        if self.image_size and img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        return img.convert('RGB')

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.name}, {len(self)} images, {len(self.classes)} classes)'


def _stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> List[np.ndarray]:
    """Split indices per class by ``fractions`` (sum 1) with a fixed permutation per class."""
    rng = np.random.RandomState(seed)
    parts: List[List[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        bounds = np.round(np.cumsum(fractions) * len(idx)).astype(int)
        start = 0
        for p, end in enumerate(bounds):
            parts[p].extend(idx[start:end].tolist())
            start = end
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def load_digits(split: str = 'train', image_size: Optional[int] = 28, transform: Optional[Callable] = None,
                ) -> ArrayImageDataset:
    """scikit-learn's 8x8 digits, split 70/15/15 per class (fixed seed), upsampled to ``image_size``."""
    _check_split(split)
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise DataError("the built-in 'digits' data set needs scikit-learn: pip install scikit-learn "
                        "(or pip install 'vitfree[dev]')") from None
    d = _sk_load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 0..16 -> 0..255
    labels = d.target.astype(np.int64)
    parts = dict(zip(SPLITS, _stratified_split(labels, (0.7, 0.15, 0.15), _SPLIT_SEED)))
    idx = parts[split]
    return ArrayImageDataset(images[idx], labels[idx], [str(i) for i in range(10)], image_size, transform,
                             name=f'digits/{split}')


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST idx files are (``VITFREE_FASHION_MNIST_DIR`` overrides)."""
    return Path(os.environ.get('VITFREE_FASHION_MNIST_DIR', FASHION_MNIST_DIR))


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f'cannot read {path}: {e}; reinstall with: {FASHION_MNIST_INSTALL}') from None
    if len(data) < 4:
        raise DataError(f'{path}: not an idx file (only {len(data)} bytes)')
    zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f'{path}: not an unsigned-byte idx file (magic {data[:4].hex()})')
    dims = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f'{path}: truncated idx file ({arr.size} values, header says {dims})')
    return arr.reshape(dims)


def load_fashion_mnist(split: str = 'train', image_size: Optional[int] = None, transform: Optional[Callable] = None,
                       ) -> ArrayImageDataset:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (train 55k / val 5k / test 10k)."""
    _check_split(split)
    root = fashion_mnist_dir()
    prefix = 't10k' if split == 'test' else 'train'
    img_file, lbl_file = root / f'{prefix}-images-idx3-ubyte.gz', root / f'{prefix}-labels-idx1-ubyte.gz'
    missing = [str(p) for p in (img_file, lbl_file) if not p.is_file()]
    if missing:
        raise DataError(f"the built-in 'fashion_mnist' data set is not installed (missing {', '.join(missing)}). "
                        f"Install Debian's package with:\n    {FASHION_MNIST_INSTALL}\n"
                        f"or point VITFREE_FASHION_MNIST_DIR at a folder holding the four *-idx*-ubyte.gz files.")
    images, labels = _read_idx(img_file), _read_idx(lbl_file).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f'{img_file}: expected (N, 28, 28) images matching {len(labels)} labels, got {images.shape}')
    if split != 'test':
        sl = slice(0, FASHION_MNIST_TRAIN) if split == 'train' else slice(FASHION_MNIST_TRAIN, None)
        images, labels = images[sl], labels[sl]
    return ArrayImageDataset(images, labels, list(FASHION_MNIST_CLASSES), image_size, transform,
                             name=f'fashion_mnist/{split}')


# ---- image folders -----------------------------------------------------------------------------
def find_unreadable_images(files: Iterable[Union[str, os.PathLike]], decode: bool = False) -> Dict[str, str]:
    """Open every file once (PIL header check; with ``decode``, every pixel is decoded too, which also
    catches a truncated file); ``{path: reason}`` for those that cannot be read."""
    bad: Dict[str, str] = {}
    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()
            if decode:
                with Image.open(path) as im:
                    im.load()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds; all mean "unreadable"
            bad[str(path)] = f'{type(e).__name__}: {e}'
    return bad


def list_image_files(folder: Union[str, os.PathLike], required: bool = True) -> List[Path]:
    """Image files under ``folder`` (recursively, sorted), by suffix (:data:`IMG_EXTENSIONS`).

    With ``required``, a missing folder or one without image files is a ``FileNotFoundError`` that
    names it; otherwise an empty list."""
    folder = Path(folder)
    if not folder.is_dir():
        if required:
            raise FileNotFoundError(f'image folder not found: {str(folder)!r}')
        return []
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files and required:
        raise FileNotFoundError(f'no image files ({", ".join(IMG_EXTENSIONS)}) under {str(folder)!r}')
    return files


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` files; classes sorted by name, or given by ``classes``.

    Args:
        root: the split folder (e.g. ``DATA/train``).
        classes: class names in label order (use the train split's for val/test so labels agree).
        verify: open every file once now; unreadable files are left out with one warning that
            lists them all (or, with ``strict``, one :class:`DataError` listing them).
        strict: refuse a folder with unreadable files instead of leaving them out.
    """

    def __init__(
            self,
            root: Union[str, os.PathLike],
            classes: Optional[Sequence[str]] = None,
            transform: Optional[Callable] = None,
            verify: bool = True,
            strict: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f'image folder not found: {self.root}')
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith('.'))
        if not found:
            raise DataError(f'{self.root} has no class folders: expected {self.root}/<class name>/<image files>')
        if classes is None:
            classes = found
        else:
            classes = list(classes)
            extra = sorted(set(found) - set(classes))
            if extra:
                raise DataError(f'{self.root} has class folders the training split does not have: {extra}; '
                                f'training classes are {classes}')
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        samples: List[Tuple[str, int]] = []
        for c in found:
            folder = self.root / c
            files = list_image_files(folder, required=False)
            if not files:
                others = sum(1 for p in folder.rglob('*') if p.is_file())
                raise DataError(f'class folder {folder} has no images'
                                + (f' ({others} other files)' if others else ' (it is empty)')
                                + f'; image files end in {", ".join(IMG_EXTENSIONS)}. Remove the folder or add images.')
            samples.extend((str(p), self.class_to_idx[c]) for p in files)
        self.samples = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.skipped: List[str] = []
        self._warned: set = set()
        if verify:
            self.verify(strict=strict)

    def verify(self, strict: bool = True, limit: int = 20) -> None:
        """Open every image (header check).  Unreadable files are listed in one :class:`DataError` when
        ``strict``, else in one warning, and left out of the data set."""
        bad = find_unreadable_images(path for path, _ in self.samples)
        if not bad:
            return
        items = [f'{path} ({why})' for path, why in bad.items()]
        shown = '\n    '.join(items[:limit])
        more = f'\n    ... and {len(items) - limit} more' if len(items) > limit else ''
        if strict:
            raise DataError(f'{len(bad)} unreadable image file(s) under {self.root}; fix or remove them '
                            f'(or leave out --strict to skip them):\n    {shown}{more}')
        self.samples = [(p, t) for p, t in self.samples if p not in bad]
        self.targets = [t for _, t in self.samples]
        self.skipped = sorted(bad)
        if not self.samples:
            raise DataError(f'no readable image under {self.root}: all {len(bad)} image files fail to open:'
                            f'\n    {shown}{more}')
        _logger.warning(f'skipping {len(bad)} unreadable image file(s) under {self.root}:\n    {shown}{more}')

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        with Image.open(path) as im:
            return im.convert('RGB')

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        # a file that fails now (after the build-time check) is skipped: the next readable one stands in
        for k in range(len(self.samples)):
            i = (index + k) % len(self.samples)
            try:
                img = self.load(i)
            except Exception as e:  # noqa: BLE001
                path = self.samples[i][0]
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f'skipping unreadable image {path} ({type(e).__name__}: {e}); '
                                  f'the next readable image is used in its place', RuntimeWarning)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, self.samples[i][1]
        raise DataError(f'no readable image left under {self.root}')

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.root}, {len(self)} images, {len(self.classes)} classes)'


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f'split must be one of {SPLITS}, got {split!r}')


def build_dataset(
        name_or_path: Union[str, os.PathLike],
        split: str = 'train',
        transform: Optional[Callable] = None,
        image_size: Optional[int] = None,
        classes: Optional[Sequence[str]] = None,
        verify: bool = True,
        strict: bool = False,
) -> Dataset:
    """A data set by built-in name (``digits``, ``fashion_mnist``) or image folder path.

    Args:
        name_or_path: a built-in name or a folder holding ``train/`` and ``val/`` (``test/`` optional).
        split: ``train``, ``val`` or ``test``.
        transform: applied to each PIL image.
        image_size: built-in sets only: side of the square images handed out (digits default 28,
            Fashion-MNIST default 28, its native size).
        classes: folders only: class names in label order (defaults to the ``train`` split's).
        verify: folders only: check every image file before returning (see module docs).
        strict: folders only: refuse unreadable image files instead of leaving them out.

    Returns:
        a Dataset of ``(image, label)`` with ``.classes``.
    """
    _check_split(split)
    name = str(name_or_path)
    key = name.lower().replace('-', '_')
    if key in BUILTIN_DATASETS and not Path(name).is_dir():
        if key == 'digits':
            return load_digits(split, image_size=image_size or 28, transform=transform)
        return load_fashion_mnist(split, image_size=image_size, transform=transform)
    root = Path(name).expanduser()
    if not root.exists():
        raise DataError(f'DATA {name!r} is neither a built-in data set ({", ".join(BUILTIN_DATASETS)}) '
                        f'nor an existing folder')
    if not root.is_dir():
        raise DataError(f'DATA {root} is a file; expected a folder with train/ and val/ sub-folders of class folders')
    missing = [s for s in ('train', 'val') if not (root / s).is_dir()]
    if missing:
        raise DataError(f'{root} must hold train/ and val/ sub-folders, each with one folder per class '
                        f'({root}/train/<class>/<images>); missing: {", ".join(str(root / m) for m in missing)}')
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f'{root} has no {split}/ sub-folder ({split_dir})')
    if classes is None and split != 'train':
        classes = sorted(p.name for p in (root / 'train').iterdir() if p.is_dir() and not p.name.startswith('.'))
    return ImageFolderDataset(split_dir, classes=classes, transform=transform, verify=verify, strict=strict)


# ---- deterministic augmentation ---------------------------------------------------------------
class TransformDataset(Dataset):
    """Apply ``transform`` with random state derived from ``(seed, epoch, index)`` only.

    Augmentation then depends neither on the number of loader workers, nor on the number of
    processes, nor on where a run was resumed: the same sample in the same epoch always gets the
    same crop and flip.  The caller's global random states are left as they were.
    """

    def __init__(self, dataset: Dataset, transform: Optional[Callable], seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.classes = getattr(dataset, 'classes', None)
        self.targets = getattr(dataset, 'targets', None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, target = self.dataset[index]
        if self.transform is None:
            return img, target
        s = (self.seed * 1_000_003 + self.epoch * 7_919 + int(index)) % (2 ** 31)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s)
            torch.default_generator.manual_seed(s)  # CPU only: leaves CUDA generators alone
            img = self.transform(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
        return img, target
