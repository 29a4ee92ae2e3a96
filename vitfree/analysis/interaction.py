"""Patch interaction maps: how strongly each patch affects each other patch, block by block.

For block ``l`` the map ``P_l`` is an ``N x N`` matrix (``N`` patches of the grid, queries are
rows) with non-negative entries and rows summing to one.  Three ways to estimate the raw
interaction ``I_l(i, j)`` before the rows are rescaled:

``attention``
    the post-softmax attention of query ``i`` on key ``j``, averaged over heads.
``attribution``
    gradient times attention: ``|sum_h A_h(i, j) * dS/dA_h(i, j)|`` with ``S`` the logit of a
    target class (the predicted one by default).
``ablation``
    remove key ``j`` from block ``l`` (for every query, the remaining probabilities are
    renormalised), rerun that block alone from its recorded input, and measure how much the
    block's output at ``i`` moves: ``||z_i - z_i(without j)|| / ||z_i||``.  This costs ``N`` block
    evaluations per image and block, batched over ``j``.

Whatever the estimator, ``I`` is averaged over the images first, and only then are the rows
rescaled to sum to one; a row with no interaction at all (all zeros) becomes a unit mass on
the patch itself.

Images can be given in several forms, see :func:`iter_images`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .hooks import attention_modules, attention_override, capture_block_io, normalize_blocks, num_prefix_tokens, \
    patch_grid

__all__ = [
    'interaction', 'InteractionResult', 'ESTIMATORS', 'row_normalize', 'iter_images', 'describe_images',
    'model_transform', 'to_display_image', 'list_image_files', 'ImageFiles', 'model_name', 'eval_mode',
    'resolve_targets',
]

ESTIMATORS = ('attention', 'attribution', 'ablation')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
ImagesLike = Any  # tensor | (tensor, labels) | DataLoader | Dataset | list of images/paths | folder path


# ---- results ---------------------------------------------------------------------------------
@dataclass
class InteractionResult:
    """Per-block interaction maps and how they were obtained.

    ``maps[block]`` is a float32 CPU tensor ``(N, N)`` (or ``(heads, N, N)`` when measured per
    head) whose rows sum to one; row ``i`` says how patch ``i`` is affected by every patch.
    Patches are numbered row-major on ``grid = (H, W)``.
    """
    maps: Dict[int, torch.Tensor]
    grid: Tuple[int, int]
    estimator: str
    num_images: int
    num_prefix_tokens: int = 0
    per_head: bool = False
    target: Optional[str] = None
    data: Optional[str] = None
    model: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> List[int]:
        return sorted(self.maps)

    def __getitem__(self, block: int) -> torch.Tensor:
        if block not in self.maps:
            raise KeyError(f'block {block} was not measured (measured blocks: {self.blocks})')
        return self.maps[block]

    def head_mean(self, block: int) -> torch.Tensor:
        """The ``(N, N)`` map of a block (per-head maps averaged over heads)."""
        m = self[block]
        return m.mean(0) if m.dim() == 3 else m

    def importance(self, blocks: Optional[Iterable[int]] = None) -> torch.Tensor:
        """How much each patch matters to the others: column sums of ``P`` averaged over the
        chosen blocks (all measured ones by default), shape ``(N,)``; they sum to ``N``."""
        blocks = self.blocks if blocks is None else list(blocks)
        return torch.stack([self.head_mean(b).sum(0) for b in blocks]).mean(0)


# ---- small helpers ---------------------------------------------------------------------------
def row_normalize(m: torch.Tensor) -> torch.Tensor:
    """Rescale the last axis to sum to one; all-zero rows of square ``(..., N, N)`` maps become a
    unit mass on the diagonal (the patch only interacts with itself)."""
    s = m.sum(-1, keepdim=True)
    out = m / torch.where(s > 0, s, torch.ones_like(s))
    zero = (s <= 0).squeeze(-1)
    if zero.any() and m.shape[-1] == m.shape[-2]:
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)
        out = torch.where(zero.unsqueeze(-1), eye, out)
    return out


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


# ---- the estimators --------------------------------------------------------------------------
def _check_grid(model: nn.Module, x: torch.Tensor, grid: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    g = patch_grid(model, x.shape[-2:])
    if grid is not None and g != grid:
        raise ValueError(f'all images must give the same patch grid to be averaged: got {g} after {grid} '
                         f'(image size {tuple(x.shape[-2:])}); resize them to one size')
    return g


def _accumulate_attention(model, x, blocks, acc, npt, per_head) -> None:
    def on_probs(block: int, probs: torch.Tensor) -> None:
        a = probs[:, :, npt:, npt:].double()
        a = a.sum(0) if per_head else a.mean(1).sum(0)
        acc[block] = a if block not in acc else acc[block] + a

    with torch.no_grad(), attention_override(model, blocks, probs_fn=on_probs):
        model(x)


def _accumulate_attribution(model, x, y, blocks, acc, npt, per_head, target, max_bytes) -> None:
    from .recorder import Recorder
    with torch.enable_grad(), Recorder(model, blocks, grad=True, max_bytes=max_bytes) as rec:
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        tgt = resolve_targets(logits, y, target)
        score = logits.gather(1, tgt[:, None]).sum()
        attn = [rec.attention[b] for b in blocks]
        grads = torch.autograd.grad(score, attn, allow_unused=True)
    for b, a, g in zip(blocks, attn, grads):
        if g is None:
            g = torch.zeros_like(a)
        prod = (a.detach() * g)[:, :, npt:, npt:].double()
        i = prod.abs().sum(0) if per_head else prod.sum(1).abs().sum(0)
        acc[b] = i if b not in acc else acc[b] + i


def _accumulate_ablation(model, x, blocks, acc, npt, chunk) -> None:
    """Remove one key at a time from block ``l`` and rerun that block from its recorded input.

    Every call carries an unablated copy of the image first, so the reference output comes
    from the very same batched computation and keys outside a query's window give exactly 0.
    """
    with torch.no_grad(), capture_block_io(model, blocks) as io:
        model(x)
    keys_per_call = max(1, chunk - 1)
    with torch.no_grad():
        for b in blocks:
            xin = io[b]['input']
            B, T, C = xin.shape
            n = T - npt
            total = acc.get(b)
            if total is None:
                total = torch.zeros(n, n, dtype=torch.float64, device=xin.device)
            mask_box: Dict[str, torch.Tensor] = {}

            def on_logits(block: int, logits: torch.Tensor) -> torch.Tensor:
                return logits.masked_fill(mask_box['keys'][:, None, None, :], float('-inf'))

            def on_probs(block: int, probs: torch.Tensor) -> torch.Tensor:
                return probs.nan_to_num(0.0)  # a query whose only key was removed gets no attention

            with attention_override(model, [b], logits_fn=on_logits, probs_fn=on_probs):
                for img in range(B):
                    for s in range(0, n, keys_per_call):
                        js = torch.arange(s, min(n, s + keys_per_call), device=xin.device)
                        c = js.numel()
                        keys = torch.zeros(c + 1, T, dtype=torch.bool, device=xin.device)
                        keys[torch.arange(1, c + 1, device=xin.device), npt + js] = True
                        mask_box['keys'] = keys
                        z = model.blocks[b](xin[img:img + 1].expand(c + 1, T, C))[:, npt:]
                        ref, abl = z[:1], z[1:]
                        d = (abl - ref).double().norm(dim=-1) / ref.double().norm(dim=-1).clamp_min(1e-12)
                        total[:, js] += d.T  # rows are queries i, columns the removed keys j
            acc[b] = total


def interaction(
        model: nn.Module,
        images: ImagesLike,
        estimator: str = 'attention',
        blocks: Optional[Iterable[int]] = None,
        *,
        num_images: Optional[int] = None,
        batch_size: int = 16,
        target: Union[str, int] = 'predicted',
        per_head: bool = False,
        ablation_batch: int = 64,
        max_bytes: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
        data: Optional[str] = None,
) -> InteractionResult:
    """Patch interaction maps of a timm ViT-family model, averaged over images.

    Args:
        model: WinfT, ``vit_*``, ``deit_*`` (class/register tokens and ``dynamic_img_size`` are
            fine; all images must then have one size).
        images: see :func:`iter_images` (tensor batch, ``(tensor, labels)``, DataLoader, Dataset,
            list, folder).
        estimator: ``'attention'``, ``'attribution'`` or ``'ablation'`` (module docstring).
        blocks: which blocks to measure; ``None`` = all.
        num_images: use at most this many images (``None`` = all given).
        batch_size: images per forward (Dataset/list/tensor inputs; a DataLoader's own batches
            are used as they come).
        target: for ``attribution``: ``'predicted'``, ``'label'`` or a class index.
        per_head: keep one map per head (``attention`` and ``attribution`` only).
        ablation_batch: block evaluations per batched call of the ``ablation`` estimator.
        max_bytes: memory limit of the attention recording used by ``attribution`` (see
            :class:`~vitfree.analysis.recorder.Recorder`).
        device: where to run (default: where the model's parameters are).
        progress: show a progress bar over images.
        data: a description of the images for the result (default: derived from ``images``).

    Returns an :class:`InteractionResult`; ``result[block]`` is the row-normalised map.  The
    model runs in eval mode and is left as it was found.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f'unknown interaction estimator {estimator!r}; choose one of {ESTIMATORS}')
    if per_head and estimator == 'ablation':
        raise ValueError("per_head=True is not defined for the 'ablation' estimator (it removes keys from all "
                         "heads at once); use 'attention' or 'attribution'")
    if estimator == 'ablation' and ablation_batch < 2:
        raise ValueError(f'ablation_batch must be >= 2 (one reference plus at least one removed key), '
                         f'got {ablation_batch}')
    if estimator == 'attribution' and target not in ('predicted', 'label') and not isinstance(target, int):
        raise ValueError(f"target must be 'predicted', 'label' or a class index, got {target!r}")
    depth = len(attention_modules(model))
    chosen = normalize_blocks(blocks, depth)
    npt = num_prefix_tokens(model)
    from tqdm.auto import tqdm
    acc: Dict[int, torch.Tensor] = {}
    grid: Optional[Tuple[int, int]] = None
    count = 0
    bar = tqdm(total=_count(images, num_images), unit='img', desc=f'interaction ({estimator})',
               disable=not progress, leave=False)
    try:
        with eval_mode(model):
            for x, y in iter_images(model, images, batch_size, num_images, device):
                grid = _check_grid(model, x, grid)
                if estimator == 'attention':
                    _accumulate_attention(model, x, chosen, acc, npt, per_head)
                elif estimator == 'attribution':
                    _accumulate_attribution(model, x, y, chosen, acc, npt, per_head, target, max_bytes)
                else:
                    _accumulate_ablation(model, x, chosen, acc, npt, ablation_batch)
                count += x.shape[0]
                bar.update(x.shape[0])
    finally:
        bar.close()
    if count == 0:
        raise ValueError(f'no images to measure: {describe_images(images)} yielded none')
    maps = {b: row_normalize(acc[b] / count).float().cpu() for b in chosen}
    return InteractionResult(
        maps=maps, grid=grid, estimator=estimator, num_images=count, num_prefix_tokens=npt, per_head=per_head,
        target=(str(target) if estimator == 'attribution' else None),
        data=data if data is not None else describe_images(images), model=model_name(model),
    )
