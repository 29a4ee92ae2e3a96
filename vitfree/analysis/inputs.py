"""What the analyses read: images, data sets and labels, and how images are shown.

Every analysis takes its images in the same forms (see :func:`iter_images`): a normalised
tensor batch, an ``(images, labels)`` pair, a DataLoader, a Dataset of images or
``(image, label)`` items, a list of images or paths, or a folder.  :func:`open_data` turns
what a user types on the command line (a folder, image files, a built-in data set name, a
``.npz`` file of images) into such a Dataset, and :func:`load_images` into one batch with a
name and label per image.  :func:`to_display_image` undoes the model's normalisation, so
pictures and SIFT see the pixels the model sees.  :class:`ImageLoop` is the one loop every
analysis runs over its images (eval mode, progress bar, one patch grid, an error for empty input).

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

from ..data import IMG_EXTENSIONS, list_image_files

__all__ = [
    'ImagesLike', 'eval_mode', 'model_name', 'model_transform', 'to_display_image',
    'list_image_files', 'ImageFiles', 'describe_images', 'iter_images', 'ImageLoop', 'patch_grid',
    'resolve_targets', 'progress_bar',
    'LoadedImages', 'load_images', 'gather_images', 'open_data',
]

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


Batch = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _is_labelled_pair(images: Any) -> bool:
    return isinstance(images, tuple) and len(images) == 2 and torch.is_tensor(images[0]) and torch.is_tensor(images[1])


def _tensor_batches(images: Any, batch_size: int) -> Iterator[Batch]:
    """Batches of a ``(B, C, H, W)`` / ``(C, H, W)`` tensor or a ``(tensor, labels)`` pair."""
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
        yield x[s:s + batch_size], None if y is None else y[s:s + batch_size]


def _loader_batches(loader: Any) -> Iterator[Batch]:
    """The batches of a DataLoader: tensors, ``(images, labels, ...)`` or dicts."""
    for batch in loader:
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
            raise TypeError(f'DataLoader batches must hold image tensors (use a transform), got {type(x).__name__}')
        if y is not None and (not torch.is_tensor(y) or y.dim() != 1 or bool((y < 0).any())):
            y = None
        yield x, y


def _dataset_batches(model: nn.Module, images: Any, batch_size: int, limit: float) -> Iterator[Batch]:
    """Batches of a Dataset or list of images / ``(image, label)`` items (at most ``limit`` images);
    non-tensor images go through the model's evaluation transform."""
    if not (hasattr(images, '__getitem__') and hasattr(images, '__len__')):
        raise TypeError(f'images must be a tensor, a (tensor, labels) pair, a DataLoader, a Dataset, a list of '
                        f'images or a folder path, got {type(images).__name__}')
    if len(images) == 0:
        raise ValueError('no images given (empty dataset or list)')
    transform = None
    mode = 'L' if _in_chans(model) == 1 else 'RGB'
    xs: List[torch.Tensor] = []
    ys: List[Optional[int]] = []
    for i in range(int(min(len(images), limit))):
        img, y = _split_item(images[i])
        if not torch.is_tensor(img) and transform is None:
            transform = model_transform(model)
        xs.append(_to_tensor_image(img, transform, mode))
        ys.append(y)
        if len(xs) == batch_size:
            yield _stack(xs, ys)
            xs, ys = [], []
    if xs:
        yield _stack(xs, ys)


def iter_images(
        model: nn.Module,
        images: ImagesLike,
        batch_size: int = 16,
        num_images: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
) -> Iterator[Batch]:
    """Yield ``(x, labels_or_None)`` batches on ``device`` from any of:

    * a tensor ``(B, C, H, W)`` (or one image ``(C, H, W)``), already normalised for the model;
    * a pair ``(images_tensor, labels_tensor)``;
    * a ``DataLoader`` yielding tensors or ``(images, labels, ...)`` batches (used as is);
    * a ``Dataset`` (anything with ``__getitem__`` and ``__len__``) of images or ``(image, label)``
      items, where an image is a tensor, a PIL image, a uint8 array or a path; non-tensor images
      go through the model's evaluation transform (:func:`model_transform`);
    * a list of such images, or a folder (read recursively with PIL).

    Labels below zero count as unknown.  At most ``num_images`` images are yielded (all when
    ``None``).  The analyses run this inside :class:`ImageLoop`.
    """
    from torch.utils.data import DataLoader
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if num_images is not None and num_images < 1:
        raise ValueError(f'num_images must be >= 1 (or None for all), got {num_images}')
    device = _model_device(model) if device is None else torch.device(device)
    budget = float('inf') if num_images is None else int(num_images)
    if isinstance(images, (str, os.PathLike)):
        images = ImageFiles(images)
    if torch.is_tensor(images) or _is_labelled_pair(images):
        batches = _tensor_batches(images, batch_size)
    elif isinstance(images, DataLoader):
        batches = _loader_batches(images)
    else:
        batches = _dataset_batches(model, images, batch_size, budget)
    seen = 0
    for x, y in batches:
        if seen >= budget:
            return
        take = int(min(x.shape[0], budget - seen))
        seen += take
        yield x[:take].to(device), (None if y is None else y[:take].to(device))


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


def patch_grid(model: nn.Module, image_size: Optional[Sequence[int]] = None) -> Tuple[int, int]:
    """The patch grid ``(H, W)`` the model uses for images of ``image_size = (h, w)`` pixels
    (its native grid when ``image_size`` is None or the model has a fixed input size)."""
    pe = getattr(model, 'patch_embed', None)
    if pe is None or not hasattr(pe, 'grid_size'):
        raise TypeError(f'{type(model).__name__} has no patch_embed.grid_size; expected a timm ViT-family model')
    if image_size is not None and getattr(model, 'dynamic_img_size', False):
        return tuple(int(g) for g in pe.dynamic_feat_size(tuple(int(s) for s in image_size)))
    return tuple(int(g) for g in pe.grid_size)


class ImageLoop:
    """The one image loop every analysis runs::

        with ImageLoop(model, images, 'patch removal', batch_size=8, progress=True) as loop:
            for x, y in loop:          # (B, C, H, W) on the device, labels or None
                ...                    # loop.grid: the patch grid, the same for every batch

    Inside the ``with``: the model in eval mode (every module's own flag restored on exit),
    gradients off unless ``grad=True``, and a progress bar over images (or over ``per_image``
    steps per image, which the body advances with ``loop.bar.update`` when ``auto_update`` is
    off).  Iterating checks that every batch gives the same patch grid, and raises a
    ``ValueError`` naming the source when it yielded no image at all.  ``loop.count`` is the
    number of images seen.  Batches come from :func:`iter_images`.
    """

    def __init__(self, model: nn.Module, images: ImagesLike, desc: str, *, batch_size: int = 16,
                 num_images: Optional[int] = None, device: Union[str, torch.device, None] = None,
                 progress: bool = True, grad: bool = False, unit: str = 'img', per_image: int = 1,
                 auto_update: bool = True) -> None:
        self.model, self.images, self.desc = model, images, desc
        self.batch_size, self.num_images, self.device = batch_size, num_images, device
        self.progress, self.grad, self.unit, self.per_image = progress, grad, unit, per_image
        self.auto_update = auto_update
        self.grid: Optional[Tuple[int, int]] = None
        self.count = 0
        self.bar = None
        self._stack: Optional[contextlib.ExitStack] = None

    def __enter__(self) -> 'ImageLoop':
        total = _count(self.images, self.num_images)
        stack = contextlib.ExitStack()
        stack.enter_context(eval_mode(self.model))
        if not self.grad:
            stack.enter_context(torch.no_grad())
        self.bar = progress_bar(None if total is None else total * self.per_image, self.desc, self.progress,
                                unit=self.unit)
        stack.callback(self.bar.close)
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __iter__(self) -> Iterator[Batch]:
        if self._stack is None:
            raise RuntimeError('iterate an ImageLoop inside its `with` block')
        for x, y in iter_images(self.model, self.images, self.batch_size, self.num_images, self.device):
            g = patch_grid(self.model, x.shape[-2:])
            if self.grid is not None and g != self.grid:
                raise ValueError(f'all images must give the same patch grid: got {g} after {self.grid} (image size '
                                 f'{tuple(x.shape[-2:])}); resize them to one size')
            self.grid = g
            yield x, y
            self.count += x.shape[0]
            if self.auto_update:
                self.bar.update(x.shape[0] * self.per_image)
        if self.count == 0:
            raise ValueError(f'no images: {describe_images(self.images)} yielded none')


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
        elif p.suffix.lower() in IMG_EXTENSIONS + ('.npz',):
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


def gather_images(model: nn.Module, images: ImagesLike, max_images: Optional[int] = None,
                  device: Union[str, torch.device, None] = None) -> Batch:
    """Every image (at most ``max_images``) as one batch ``x`` with its ``labels`` (``None`` unless every
    image has one), through the :class:`ImageLoop`."""
    xs: List[torch.Tensor] = []
    ys: List[Optional[torch.Tensor]] = []
    with ImageLoop(model, images, 'reading images', num_images=max_images, device=device, progress=False) as loop:
        for x, y in loop:
            xs.append(x)
            ys.append(y)
    return torch.cat(xs), (None if any(y is None for y in ys) else torch.cat(ys))


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
    total: Optional[int] = None  # images the source holds (more than len(x) when max_images cut it)


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
    x, labels = gather_images(model, dataset, max_images, device)
    classes = getattr(dataset, 'classes', None)
    if classes is None and isinstance(dataset, torch.utils.data.ConcatDataset):
        found = {tuple(getattr(d, 'classes', None) or ()) for d in dataset.datasets}
        classes = list(found.pop()) if len(found) == 1 else None
    return LoadedImages(x, _item_names(dataset, len(x), desc), labels, list(classes) if classes else None, desc,
                        total=_count(dataset, None))
