"""What the analyses read: images, data sets and labels, and how images are shown.

Every analysis takes its images in the same forms (see :func:`iter_images`): a normalised
tensor batch, an ``(images, labels)`` pair, a DataLoader, a Dataset of images or
``(image, label)`` items, a list of images or paths, or a folder.  :func:`open_data` turns
what a user types on the command line (a folder, image files, a built-in data set name, a
``.npz`` file of images) into such a Dataset, and :func:`load_images` into one batch with a
name and label per image.  :func:`to_display_image` undoes the model's normalisation, so
pictures and SIFT see the pixels the model sees.

Nothing here knows about attention; the rest of :mod:`vitfree.analysis` builds on this module.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    'ImagesLike', 'IMAGE_SUFFIXES', 'eval_mode', 'model_name', 'model_transform', 'to_display_image',
    'list_image_files', 'ImageFiles', 'describe_images', 'iter_images', 'resolve_targets', 'progress_bar',
    'LoadedImages', 'load_images', 'open_data',
]

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
ImagesLike = Any  # tensor | (tensor, labels) | DataLoader | Dataset | list of images/paths | folder path


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode for the duration (no dropout, no drop-path), then restore
    every module's own ``training`` flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def model_name(model: nn.Module) -> str:
    """``architecture[.tag]`` from timm's ``pretrained_cfg``, else the class name."""
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    arch = cfg.get('architecture')
    if not arch:
        return type(model).__name__
    tag = cfg.get('tag')
    return f'{arch}.{tag}' if tag else arch


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device('cpu')


def _in_chans(model: nn.Module) -> int:
    proj = getattr(getattr(model, 'patch_embed', None), 'proj', None)
    return int(getattr(proj, 'in_channels', 3))


def model_transform(model: nn.Module) -> Callable:
    """timm's evaluation transform for the model (resize, centre crop, normalise), sized for the
    model's own input size (``patch_embed.img_size``) rather than its pretrained config's."""
    from timm.data import create_transform, resolve_model_data_config
    cfg = dict(resolve_model_data_config(model))
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is not None:
        cfg['input_size'] = (_in_chans(model), int(img_size[0]), int(img_size[1]))
    return create_transform(**cfg, is_training=False)


def to_display_image(x: torch.Tensor, model: Optional[nn.Module] = None,
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> np.ndarray:
    """Undo the model's normalisation of one image ``(C, H, W)``: an ``(H, W, 3)`` uint8 array, the
    image as the model sees it (after resize and crop)."""
    if x.dim() == 4:
        x = x[0]
    if mean is None or std is None:
        if model is not None:
            from timm.data import resolve_model_data_config
            cfg = resolve_model_data_config(model)
            mean, std = cfg['mean'], cfg['std']
        else:
            mean, std = (0.0,) * x.shape[0], (1.0,) * x.shape[0]
    c = x.shape[0]
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)[:c]
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)[:c]
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    if c == 1:
        img = img.expand(3, -1, -1)
    return (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def list_image_files(folder: Union[str, os.PathLike]) -> List[Path]:
    """Image files under ``folder`` (recursively, sorted), by suffix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'image folder not found: {str(folder)!r}')
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f'no image files ({", ".join(IMAGE_SUFFIXES)}) under {str(folder)!r}')
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Images read with PIL from a list of files (or everything under a folder), without labels
    unless ``labels`` is given.  Items are ``(PIL image, label)`` with ``label = -1`` when unknown."""

    def __init__(self, files: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                 labels: Optional[Sequence[int]] = None):
        if isinstance(files, (str, os.PathLike)):
            p = Path(files)
            self.root: Optional[Path] = p if p.is_dir() else None
            files = list_image_files(p) if p.is_dir() else [p]
        else:
            self.root = None
        self.files = [Path(f) for f in files]
        if labels is not None and len(labels) != len(self.files):
            raise ValueError(f'{len(labels)} labels for {len(self.files)} image files')
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            im.load()
            img = im.copy()
        return img, (-1 if self.labels is None else int(self.labels[i]))

    def __repr__(self) -> str:
        where = str(self.root) if self.root is not None else f'{len(self.files)} files'
        return f'ImageFiles({where}, {len(self.files)} images)'


def describe_images(images: ImagesLike) -> str:
    """A short human-readable description of an image source, for provenance records."""
    from torch.utils.data import DataLoader
    if torch.is_tensor(images):
        return f'tensor batch of shape {tuple(images.shape)}'
    if isinstance(images, (str, os.PathLike)):
        return f'image files under {str(images)}' if Path(images).is_dir() else f'image {str(images)}'
    if isinstance(images, tuple) and len(images) == 2 and torch.is_tensor(images[0]):
        return f'tensor batch of shape {tuple(images[0].shape)} with labels'
    if isinstance(images, DataLoader):
        return f'DataLoader over {describe_images(images.dataset)}'
    if isinstance(images, ImageFiles):
        return repr(images)
    if hasattr(images, '__getitem__') and hasattr(images, '__len__') and not isinstance(images, (list, tuple)):
        root = getattr(images, 'root', None)
        desc = type(images).__name__ + (f'({root})' if root else '')
        return f'{desc} with {len(images)} items'
    if isinstance(images, (list, tuple)):
        return f'list of {len(images)} images'
    return type(images).__name__


def _to_tensor_image(item: Any, transform: Callable, mode: str) -> torch.Tensor:
    from PIL import Image
    if torch.is_tensor(item):
        return item
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as im:
            item = im.convert(mode)
    elif isinstance(item, np.ndarray):
        item = Image.fromarray(item)
    if not isinstance(item, Image.Image):
        raise TypeError(f'cannot read an image from {type(item).__name__}; expected a PIL image, a path, a uint8 '
                        f'array or a (C, H, W) tensor')
    if item.mode != mode:
        item = item.convert(mode)
    return transform(item)


def _split_item(item: Any) -> Tuple[Any, Optional[int]]:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        y = item[1]
        y = int(y) if isinstance(y, (int, np.integer)) or (torch.is_tensor(y) and y.numel() == 1) else None
        return item[0], (None if y is None or y < 0 else y)
    if isinstance(item, dict):
        img = item.get('image', item.get('img'))
        y = item.get('label', item.get('target'))
        return img, (None if y is None or int(y) < 0 else int(y))
    return item, None


def _stack(xs: List[torch.Tensor], ys: List[Optional[int]]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    sizes = sorted({tuple(t.shape) for t in xs})
    if len(sizes) > 1:
        raise ValueError(f'images of different sizes cannot share a batch: {sizes}; give them one size (the '
                         f'model transform does that for PIL images and paths)')
    x = torch.stack(xs)
    y = None if any(v is None for v in ys) else torch.tensor(ys, dtype=torch.long)
    return x, y


def iter_images(
        model: nn.Module,
        images: ImagesLike,
        batch_size: int = 16,
        num_images: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield ``(x, labels_or_None)`` batches on ``device`` from any of:

    * a tensor ``(B, C, H, W)`` (or one image ``(C, H, W)``), already normalised for the model;
    * a pair ``(images_tensor, labels_tensor)``;
    * a ``DataLoader`` yielding tensors or ``(images, labels, ...)`` batches (used as is);
    * a ``Dataset`` (anything with ``__getitem__`` and ``__len__``) of images or ``(image, label)``
      items, where an image is a tensor, a PIL image, a uint8 array or a path; non-tensor images
      go through the model's evaluation transform (:func:`model_transform`);
    * a list of such images, or a folder (read recursively with PIL).

    Labels below zero count as unknown.  At most ``num_images`` images are yielded (all when
    ``None``).
    """
    from torch.utils.data import DataLoader
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if num_images is not None and num_images < 1:
        raise ValueError(f'num_images must be >= 1 (or None for all), got {num_images}')
    device = _model_device(model) if device is None else torch.device(device)
    budget = float('inf') if num_images is None else int(num_images)
    seen = 0

    def emit(x: torch.Tensor, y: Optional[torch.Tensor]):
        nonlocal seen
        take = int(min(x.shape[0], budget - seen))
        seen += take
        return x[:take].to(device), (None if y is None else y[:take].to(device))

    if isinstance(images, (str, os.PathLike)):
        images = ImageFiles(images)
    if torch.is_tensor(images) or (isinstance(images, tuple) and len(images) == 2 and torch.is_tensor(images[0])
                                   and torch.is_tensor(images[1])):
        x, y = (images, None) if torch.is_tensor(images) else images
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(f'an image tensor must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}')
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f'{y.shape[0]} labels for {x.shape[0]} images')
        if y is not None and bool((y < 0).any()):
            y = None
        for s in range(0, x.shape[0], batch_size):
            if seen >= budget:
                return
            yield emit(x[s:s + batch_size], None if y is None else y[s:s + batch_size])
        return
    if isinstance(images, DataLoader):
        for batch in images:
            if seen >= budget:
                return
            if torch.is_tensor(batch):
                x, y = batch, None
            elif isinstance(batch, dict):
                x, y = batch.get('image', batch.get('img')), batch.get('label', batch.get('target'))
            elif isinstance(batch, (list, tuple)):
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                raise TypeError(f'DataLoader batches must be tensors, (images, labels) pairs or dicts, '
                                f'got {type(batch).__name__}')
            if not torch.is_tensor(x):
                raise TypeError(f'DataLoader batches must hold image tensors (use a transform), got '
                                f'{type(x).__name__}')
            if y is not None and (not torch.is_tensor(y) or y.dim() != 1 or bool((y < 0).any())):
                y = None
            yield emit(x, y)
        return
    if not (hasattr(images, '__getitem__') and hasattr(images, '__len__')):
        raise TypeError(f'images must be a tensor, a (tensor, labels) pair, a DataLoader, a Dataset, a list of '
                        f'images or a folder path, got {type(images).__name__}')
    if len(images) == 0:
        raise ValueError('no images given (empty dataset or list)')
    transform = None
    mode = 'L' if _in_chans(model) == 1 else 'RGB'
    xs: List[torch.Tensor] = []
    ys: List[Optional[int]] = []
    for i in range(len(images)):
        if seen + len(xs) >= budget:
            break
        img, y = _split_item(images[i])
        if not torch.is_tensor(img) and transform is None:
            transform = model_transform(model)
        xs.append(_to_tensor_image(img, transform, mode))
        ys.append(y)
        if len(xs) == batch_size:
            yield emit(*_stack(xs, ys))
            xs, ys = [], []
    if xs and seen < budget:
        yield emit(*_stack(xs, ys))


def _count(images: ImagesLike, num_images: Optional[int]) -> Optional[int]:
    """Number of images an iteration will yield, when it can be known up front."""
    from torch.utils.data import DataLoader
    n: Optional[int] = None
    try:
        if torch.is_tensor(images):
            n = 1 if images.dim() == 3 else images.shape[0]
        elif isinstance(images, tuple) and len(images) == 2 and torch.is_tensor(images[0]):
            n = images[0].shape[0]
        elif isinstance(images, DataLoader):
            n = len(images.dataset)
        elif isinstance(images, (str, os.PathLike)):
            n = len(list_image_files(images)) if Path(images).is_dir() else 1
        elif hasattr(images, '__len__'):
            n = len(images)
    except TypeError:
        n = None
    if num_images is None:
        return n
    return num_images if n is None else min(n, num_images)


def resolve_targets(logits: torch.Tensor, labels: Optional[torch.Tensor], target: Union[str, int]) -> torch.Tensor:
    """Class index per image: ``'predicted'`` (arg-max of the logits), ``'label'`` (the data's
    labels) or a fixed class index."""
    if logits.dim() != 2:
        raise ValueError(f'expected (B, classes) logits from the model, got shape {tuple(logits.shape)}; '
                         f'attribution needs a classification head (num_classes > 0)')
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not 0 <= int(target) < logits.shape[1]:
            raise ValueError(f'target class {target} out of range for {logits.shape[1]} classes')
        return torch.full((logits.shape[0],), int(target), dtype=torch.long, device=logits.device)
    if target == 'predicted':
        return logits.argmax(1)
    if target == 'label':
        if labels is None:
            raise ValueError("target='label' needs labelled images ((image, label) items or a (tensor, labels) "
                             "pair); use target='predicted' or a class index instead")
        return labels.to(logits.device)
    raise ValueError(f"target must be 'predicted', 'label' or a class index, got {target!r}")


def progress_bar(total: Optional[int], desc: str, enabled: bool, unit: str = 'img'):
    """A tqdm bar (disabled unless ``enabled``); callers ``update`` and ``close`` it."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


# ---- what users name on the command line ------------------------------------------------------
def _npz_dataset(path: Path):
    """A ``.npz`` file of images: ``images`` uint8 ``(N, H, W)`` (grey), optional ``labels`` ``(N,)``
    and ``classes`` (names); e.g. the bundled ``vitfree/assets/fashion_mnist_samples.npz``."""
    from ..data import ArrayImageDataset, DataError
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f'cannot read {str(path)!r} as a .npz file of images: {e}') from None
    if 'images' not in arrays:
        raise DataError(f'{str(path)!r} has no "images" array (it has: {", ".join(arrays) or "nothing"}); expected '
                        f'images uint8 (N, H, W) and optionally labels (N,) and classes')
    images = arrays['images']
    labels = arrays.get('labels')
    labels = np.full(len(images), -1) if labels is None else labels.astype(np.int64).reshape(-1)
    classes = [str(c) for c in arrays['classes']] if 'classes' in arrays else []  # [] = names unknown
    return ArrayImageDataset(images, labels, classes, name=path.name)


def open_data(sources: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
              split: str = 'train') -> Tuple[Any, str]:
    """A Dataset and a one-line description for what a user names as DATA.

    Each source is an image folder (read recursively, labels unknown), an image file, a ``.npz``
    file of images (``images`` uint8 ``(N, H, W)``, optional ``labels``, ``classes``), or a
    built-in data set name (``digits``, ``fashion_mnist``; ``split`` picks its split, see
    :func:`vitfree.data.build_dataset`).  Image files and folders given together form one
    :class:`ImageFiles`; several data sets are concatenated.  Errors name the source.
    """
    from ..data import DataError, build_dataset
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not items:
        raise DataError('no DATA given: name an image folder, image files, a .npz file or a built-in data set')
    parts: List[Tuple[Any, str]] = []
    files: List[Path] = []
    described: List[str] = []
    for s in items:
        p = Path(s).expanduser()
        if p.is_dir():
            files.extend(list_image_files(p))
            described.append(f'image files under {p}')
        elif p.is_file() and p.suffix.lower() == '.npz':
            ds = _npz_dataset(p)
            parts.append((ds, f'{p} ({len(ds)} images)'))
        elif p.is_file():
            files.append(p)
            described.append(f'image {p}')
        elif p.suffix.lower() in IMAGE_SUFFIXES + ('.npz',):
            raise FileNotFoundError(f'image file not found: {str(s)!r}')
        else:
            ds = build_dataset(str(s), split=split)  # a built-in name, else a DataError naming DATA
            parts.append((ds, f'{s} ({split} split, {len(ds)} images)'))
    if files:
        parts.insert(0, (ImageFiles(files), '; '.join(described)))
    if len(parts) == 1:
        return parts[0]
    return torch.utils.data.ConcatDataset([d for d, _ in parts]), '; '.join(t for _, t in parts)


def _item_names(dataset: Any, count: int, desc: str) -> List[str]:
    """A short name per image: file names for image files (paths where names repeat), else
    ``source #index``."""
    if isinstance(dataset, ImageFiles):
        files = dataset.files[:count]
        names = [f.name for f in files]
        dup = {n for n in names if names.count(n) > 1}
        return [str(f) if f.name in dup else f.name for f in files]
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        out: List[str] = []
        for d in dataset.datasets:
            out += _item_names(d, count - len(out), type(d).__name__)
            if len(out) >= count:
                break
        return out[:count]
    label = getattr(dataset, 'name', None) or desc.split(' (')[0]
    return [f'{label} #{i}' for i in range(min(count, len(dataset)))]


@dataclass
class LoadedImages:
    """A batch ready for the model: ``x`` ``(B, C, H, W)`` normalised, a name per image,
    ``labels`` ``(B,)`` (``None`` unless every image has one), ``classes`` (label names or
    ``None``) and a description of the source."""
    x: torch.Tensor
    names: List[str]
    labels: Optional[torch.Tensor]
    classes: Optional[List[str]]
    source: str


def load_images(
        model: nn.Module,
        sources: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        max_images: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        split: str = 'train',
) -> LoadedImages:
    """What :func:`open_data` finds, through the model's eval transform, as one batch (at most
    ``max_images`` images, in order)."""
    if max_images is not None and max_images < 1:
        raise ValueError(f'max_images must be >= 1 (or None for all), got {max_images}')
    dataset, desc = open_data(sources, split)
    xs, ys = [], []
    for x, y in iter_images(model, dataset, batch_size=16, num_images=max_images, device=device):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f'no images in {desc}')
    x = torch.cat(xs)
    labels = None if any(y is None for y in ys) else torch.cat(ys)
    classes = getattr(dataset, 'classes', None)
    if classes is None and isinstance(dataset, torch.utils.data.ConcatDataset):
        found = {tuple(getattr(d, 'classes', None) or ()) for d in dataset.datasets}
        classes = list(found.pop()) if len(found) == 1 else None
    return LoadedImages(x, _item_names(dataset, len(x), desc), labels, list(classes) if classes else None, desc)
