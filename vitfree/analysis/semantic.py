"""Semantic (SIFT) interrelation: does attention go where the image has structure?

SIFT keypoints (OpenCV, default parameters) are detected on the image exactly as the model
sees it: after the model's resize and crop, before normalisation (a normalised tensor is
mapped back to pixels with the model's mean and std).  A keypoint belongs to the patch that
contains its position.  Each patch gets a *semantic mass* ``c_p``:

``count``     the number of keypoints in the patch (default);
``response``  the sum of their detector responses;
``scale``     every keypoint spreads one unit of mass as a Gaussian of ``sigma = size / 2``
              pixels (``size`` is OpenCV's keypoint diameter) over the patches it covers,
              renormalised to one unit inside the image.

and a *semantic weight* ``w_p = c_p / sum_q c_q`` (sums to one; all zeros for an image
without keypoints).  *Concentration groups*: group 0 holds the patches that contain no
keypoint at all (by position, whatever the weighting), groups 1-3 (``low``, ``mid``,
``high``) split the other patches at the tertiles of ``c_p``.  A group can be empty when many
patches share one value.

Lifts, per block and head (values above 1 mean "more than chance"):

* *query lift*: for patch query ``i``, ``S_i = sum_j A(i, j) w_j`` divided by what uniform
  attention over the same keys would give.  ``A`` is the patch-to-patch attention rescaled
  to sum to one per query, and "the same keys" are the keys the block lets ``i`` see (all
  patches in a ViT, the window in a WinfT), so windows alone never produce a lift.  Queries
  whose keys carry no semantic weight at all are left out.
* *group lift*: ``R_ab = mean_{i in a} sum_{j in b} A(i, j)`` divided by its uniform value
  (``|b| / N`` in a global block).
* *class-token lift*: the class token's share of patch attention on each group, divided by
  the group's share of patches.

An image is flagged as a possible *spurious correlation* when the class token of a chosen
block (default: the last), averaged over heads, puts more than ``threshold`` of its patch
attention on keypoint-free patches.  *Prompting* re-predicts with the keypoint-free (or the
lowest-mass) patches masked out as keys in every block, against masking as many random
patches.  :func:`keypoint_guided_masks` samples masks for masked-image pre-training that keep
patches visible with probability proportional to ``(c_p + eps) ** temperature``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .capture import (attention_modules, attention_pass, class_token_index, mask_patch_keys, normalize_blocks,
                      num_prefix_tokens)
from .inputs import ImageLoop, ImagesLike, describe_images, model_name, to_display_image

__all__ = [
    'WEIGHTS', 'GROUP_NAMES', 'Keypoints', 'SemanticImage', 'SemanticResult', 'PromptingResult',
    'detect_keypoints', 'keypoint_patch_mass', 'concentration_groups', 'patch_semantic_mass', 'semantic_image',
    'block_lifts', 'semantic_interrelation', 'prompting', 'visible_probabilities', 'keypoint_guided_masks',
]

WEIGHTS = ('count', 'response', 'scale')
GROUP_NAMES = ('none', 'low', 'mid', 'high')


# ---- keypoints and patch weights -----------------------------------------------------------------
@dataclass
class Keypoints:
    """SIFT keypoints as arrays: position ``x``, ``y`` (pixels), ``size`` (diameter), ``response``."""
    x: np.ndarray
    y: np.ndarray
    size: np.ndarray
    response: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @classmethod
    def from_arrays(cls, x, y, size=None, response=None) -> 'Keypoints':
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        size = np.full_like(x, 2.0) if size is None else np.asarray(size, dtype=np.float64).reshape(-1)
        response = np.ones_like(x) if response is None else np.asarray(response, dtype=np.float64).reshape(-1)
        if not len(x) == len(y) == len(size) == len(response):
            raise ValueError(f'keypoint arrays differ in length: x {len(x)}, y {len(y)}, size {len(size)}, '
                             f'response {len(response)}')
        return cls(x, y, size, response)


def _gray_uint8(image: np.ndarray) -> np.ndarray:
    import cv2
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f'SIFT needs a uint8 image (as the model sees it, before normalisation), got {a.dtype}; '
                         f'map a normalised tensor back with vitfree.analysis.inputs.to_display_image')
    if a.ndim == 2:
        return np.ascontiguousarray(a)
    if a.ndim == 3 and a.shape[2] in (1, 3):
        return np.ascontiguousarray(a[..., 0]) if a.shape[2] == 1 else cv2.cvtColor(np.ascontiguousarray(a),
                                                                                      cv2.COLOR_RGB2GRAY)
    raise ValueError(f'image must be (H, W) or (H, W, 3) uint8, got shape {a.shape}')


def detect_keypoints(image: np.ndarray) -> Keypoints:
    """OpenCV SIFT keypoints (``cv2.SIFT_create()`` with default parameters) of a uint8 image."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError("SIFT needs OpenCV: pip install opencv-python-headless (or 'vitfree[analysis]')") from e
    kps = cv2.SIFT_create().detect(_gray_uint8(image), None)
    return Keypoints.from_arrays([k.pt[0] for k in kps], [k.pt[1] for k in kps], [k.size for k in kps],
                                 [k.response for k in kps])


def _patch_of(kp: Keypoints, image_size: Tuple[int, int], grid: Tuple[int, int]) -> np.ndarray:
    h, w = image_size
    gh, gw = grid
    r = np.clip(np.floor(kp.y * gh / h), 0, gh - 1).astype(np.int64)
    c = np.clip(np.floor(kp.x * gw / w), 0, gw - 1).astype(np.int64)
    return r * gw + c


def _gaussian_cell_mass(centre: np.ndarray, sigma: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``(K, cells)``: mass of 1-D Gaussians between consecutive ``edges``."""
    from scipy.special import ndtr
    z = (edges[None, :] - centre[:, None]) / sigma[:, None]
    return np.diff(ndtr(z), axis=1)


def keypoint_patch_mass(
        keypoints: Keypoints,
        image_size: Sequence[int],
        grid: Sequence[int],
        weight: str = 'count',
) -> Tuple[np.ndarray, np.ndarray]:
    """Per patch ``(counts, mass)``, both ``(H*W,)`` row-major: how many keypoints fall in each
    patch, and its semantic mass ``c_p`` under ``weight`` (module docstring)."""
    if weight not in WEIGHTS:
        raise ValueError(f'weight must be one of {WEIGHTS}, got {weight!r}')
    h, w = int(image_size[0]), int(image_size[1])
    gh, gw = int(grid[0]), int(grid[1])
    n = gh * gw
    counts = np.zeros(n)
    if len(keypoints) == 0:
        return counts, np.zeros(n)
    p = _patch_of(keypoints, (h, w), (gh, gw))
    np.add.at(counts, p, 1.0)
    if weight == 'count':
        return counts, counts.copy()
    if weight == 'response':
        mass = np.zeros(n)
        np.add.at(mass, p, keypoints.response)
        return counts, mass
    sigma = np.maximum(keypoints.size / 2.0, 1e-3)
    my = _gaussian_cell_mass(keypoints.y, sigma, np.linspace(0, h, gh + 1))  # (K, gh)
    mx = _gaussian_cell_mass(keypoints.x, sigma, np.linspace(0, w, gw + 1))  # (K, gw)
    per = my[:, :, None] * mx[:, None, :]  # (K, gh, gw)
    inside = per.sum((1, 2), keepdims=True)
    per = per / np.where(inside > 0, inside, 1.0)
    return counts, per.sum(0).reshape(n)


def concentration_groups(
        counts: np.ndarray,
        mass: np.ndarray,
        quantiles: Sequence[float] = (1 / 3, 2 / 3),
) -> np.ndarray:
    """``(N,)`` group per patch: 0 = no keypoint in the patch; 1, 2, 3 = ``c_p`` at or below the
    first quantile, up to the second, above it (quantiles taken over the patches that have
    keypoints)."""
    q = [float(v) for v in quantiles]
    if len(q) != 2 or not 0 < q[0] < q[1] < 1:
        raise ValueError(f'quantiles must be two increasing numbers in (0, 1), got {tuple(quantiles)}')
    counts, mass = np.asarray(counts), np.asarray(mass, dtype=np.float64)
    groups = np.zeros(counts.shape, dtype=np.int64)
    has = counts > 0
    if has.any():
        lo, hi = np.quantile(mass[has], q)
        groups[has] = np.where(mass[has] <= lo, 1, np.where(mass[has] <= hi, 2, 3))
    return groups


@dataclass
class SemanticImage:
    """The SIFT view of one image: ``image`` ``(h, w, 3)`` uint8 as the model saw it, its
    ``keypoints``, and per patch (row-major on ``grid``) ``counts``, ``mass`` (``c_p``),
    ``weights`` (``w_p``) and ``groups``."""
    image: np.ndarray
    keypoints: Keypoints
    grid: Tuple[int, int]
    counts: np.ndarray
    mass: np.ndarray
    weights: np.ndarray
    groups: np.ndarray
    weight: str = 'count'
    group_names: ClassVar[Tuple[str, ...]] = GROUP_NAMES

    @property
    def has_keypoints(self) -> bool:
        return len(self.keypoints) > 0

    def group_sizes(self) -> np.ndarray:
        return np.bincount(self.groups, minlength=4)


def semantic_image(
        image: np.ndarray,
        grid: Sequence[int],
        weight: str = 'count',
        quantiles: Sequence[float] = (1 / 3, 2 / 3),
        keypoints: Optional[Keypoints] = None,
) -> SemanticImage:
    """Keypoints (detected unless given), patch masses, weights and groups of one uint8 image."""
    arr = np.asarray(image)
    kp = detect_keypoints(arr) if keypoints is None else keypoints
    grid = (int(grid[0]), int(grid[1]))
    counts, mass = keypoint_patch_mass(kp, arr.shape[:2], grid, weight)
    total = mass.sum()
    weights = mass / total if total > 0 else np.zeros_like(mass)
    return SemanticImage(arr, kp, grid, counts, mass, weights, concentration_groups(counts, mass, quantiles), weight)


def patch_semantic_mass(image: np.ndarray, grid: Sequence[int], weight: str = 'count') -> np.ndarray:
    """``(H*W,)`` semantic weights ``w_p`` of a uint8 image (sum one; zeros without keypoints)."""
    return semantic_image(image, grid, weight).weights


# ---- lifts ---------------------------------------------------------------------------------------
def _allowed_patch_keys(attn_module: nn.Module, n: int, device) -> Optional[torch.Tensor]:
    """``(N, N)`` or ``(heads, N, N)`` bool: which patch keys each patch query may see in this
    block (``None`` = all of them)."""
    windows_for = getattr(attn_module, 'windows_for', None)
    if windows_for is None or getattr(attn_module, 'windows', None) is None:
        return None
    win = windows_for(n)
    return None if win is None else win.mask(0, device)


def block_lifts(
        probs: torch.Tensor,
        weights: torch.Tensor,
        groups: torch.Tensor,
        num_prefix_tokens: int = 0,
        cls_index: Optional[int] = None,
        allowed: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Semantic lifts of one block (module docstring).

    Args:
        probs: post-softmax attention ``(B, heads, T, T)``.
        weights: ``(B, N)`` semantic weights per image.
        groups: ``(B, N)`` concentration group (0-3) per patch.
        num_prefix_tokens: leading class/register tokens.
        cls_index: token index of the class token (``None``: no class-token lift).
        allowed: ``(N, N)`` or ``(heads, N, N)`` keys each query may see (``None``: all).

    Returns a dict of float tensors: ``query_lift`` ``(B, heads)`` (mean over queries),
    ``query_lift_map`` ``(B, heads, N)`` (``nan`` where undefined), ``group_lift``
    ``(B, heads, 4, 4)`` (rows: query group ``a``, columns: key group ``b``), and when
    ``cls_index`` is given ``cls_mass`` and ``cls_lift`` ``(B, heads, 4)``.
    """
    p = int(num_prefix_tokens)
    a = probs[..., p:, p:].float()
    b_, h_, n, _ = a.shape
    if weights.shape != (b_, n) or groups.shape != (b_, n):
        raise ValueError(f'weights and groups must be (B, N) = ({b_}, {n}), got {tuple(weights.shape)} and '
                         f'{tuple(groups.shape)}')
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    w = weights.to(a)
    m = torch.ones(n, n, dtype=a.dtype, device=a.device) if allowed is None else allowed.to(a)
    if m.dim() == 2:
        m = m.unsqueeze(0)  # (1 or heads, N, N)
    m = m.unsqueeze(0)  # (1, 1|heads, N, N)
    size = m.sum(-1)  # (1, 1|heads, N) keys per query
    s = (a * w[:, None, None, :]).sum(-1)  # (B, heads, N)
    base = (m * w[:, None, None, :]).sum(-1) / size  # (B, 1|heads, N)
    nan = torch.tensor(float('nan'), dtype=a.dtype, device=a.device)
    qmap = torch.where(base > 0, s / base.clamp_min(1e-30), nan)
    qlift = torch.nanmean(qmap, -1)
    g = torch.nn.functional.one_hot(groups.long().to(a.device), 4).to(a)  # (B, N, 4)
    mass = a @ g[:, None]  # (B, heads, N, 4): sum_{j in b} A(i, j)
    unif = (m @ g[:, None]) / size.unsqueeze(-1)  # (B, 1|heads, N, 4)
    na = g.sum(1)  # (B, 4) queries per group
    gt = g.transpose(1, 2)[:, None]  # (B, 1, 4, N)
    r = gt @ mass / na[:, None, :, None].clamp_min(1)  # (B, heads, 4, 4)
    r0 = gt @ unif / na[:, None, :, None].clamp_min(1)
    ok = (na[:, None, :, None] > 0) & (r0 > 0)
    out = {'query_lift': qlift.float(), 'query_lift_map': qmap.float(),
           'group_lift': torch.where(ok, r / r0.clamp_min(1e-30), nan).float()}
    if cls_index is not None:
        c = probs[:, :, cls_index, p:].float()
        c = c / c.sum(-1, keepdim=True).clamp_min(1e-30)
        cm = c @ g  # (B, heads, 4)
        share = (na / n)[:, None, :]
        out['cls_mass'] = cm.float()
        out['cls_lift'] = torch.where(share > 0, cm / share.clamp_min(1e-30), nan).float()
    return out


@dataclass
class SemanticResult:
    """Per-image SIFT views and per-block lifts of :func:`semantic_interrelation`.

    Arrays are indexed ``[image, block (position in blocks), head, ...]``: ``query_lift``
    ``(I, L, h)``, ``query_lift_map`` ``(I, L, N)`` (mean over heads), ``group_lift``
    ``(I, L, h, 4, 4)``, ``cls_mass`` / ``cls_lift`` ``(I, L, h, 4)`` (``None`` without a class
    token).  ``predictions``, ``confidence`` and ``labels`` (or ``None``) per image.
    """
    images: List[SemanticImage]
    blocks: List[int]
    num_heads: int
    grid: Tuple[int, int]
    weight: str
    query_lift: np.ndarray
    query_lift_map: np.ndarray
    group_lift: np.ndarray
    cls_mass: Optional[np.ndarray]
    cls_lift: Optional[np.ndarray]
    predictions: np.ndarray
    confidence: np.ndarray
    labels: Optional[np.ndarray] = None
    threshold: float = 0.5
    flag_block: int = -1
    meta: Dict[str, object] = field(default_factory=dict)
    group_names: ClassVar[Tuple[str, ...]] = GROUP_NAMES

    @property
    def num_images(self) -> int:
        return len(self.images)

    def mean_query_lift(self) -> np.ndarray:
        """``(blocks, heads)`` query lift averaged over images (``nan`` where never defined)."""
        return _nanmean(self.query_lift, 0)

    def mean_group_lift(self) -> np.ndarray:
        """``(blocks, 4, 4)`` group lift averaged over images and heads."""
        return _nanmean(self.group_lift, (0, 2))

    def mean_cls_lift(self) -> Optional[np.ndarray]:
        """``(blocks, 4)`` class-token lift per group, averaged over images and heads."""
        return None if self.cls_lift is None else _nanmean(self.cls_lift, (0, 2))

    def group0_mass(self, block: Optional[int] = None) -> Optional[np.ndarray]:
        """``(I,)`` class-token share of patch attention on keypoint-free patches in ``block``
        (a measured block index; default: the flag block), averaged over heads."""
        if self.cls_mass is None:
            return None
        block = self.flag_block if block is None else int(block)
        if block not in self.blocks:
            raise ValueError(f'block {block} was not measured (measured blocks: {self.blocks})')
        return self.cls_mass[:, self.blocks.index(block), :, 0].mean(-1)

    def flags(self, threshold: Optional[float] = None, block: Optional[int] = None) -> np.ndarray:
        """``(I,)`` bool: images whose class token leans on keypoint-free patches (module docstring)."""
        mass = self.group0_mass(block)
        if mass is None:
            return np.zeros(self.num_images, dtype=bool)
        return mass > (self.threshold if threshold is None else float(threshold))

    def flagged_by_class(self, classes: Optional[Sequence[str]] = None, threshold: Optional[float] = None,
                         names: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
        """Flagged images grouped by class (the label when known, else the prediction)."""
        cls = self.labels if self.labels is not None else self.predictions
        names = names or self.meta.get('names') or [f'image {i}' for i in range(self.num_images)]
        out: Dict[str, List[str]] = {}
        for i in np.flatnonzero(self.flags(threshold)):
            c = int(cls[i])
            key = classes[c] if classes is not None and 0 <= c < len(classes) else f'class {c}'
            out.setdefault(key, []).append(str(names[i]))
        return out

    def to_dict(self) -> Dict[str, object]:
        cl = self.mean_cls_lift()
        return {
            'weight': self.weight, 'blocks': self.blocks, 'num_images': self.num_images,
            'keypoints': [len(s.keypoints) for s in self.images],
            'group_sizes': [s.group_sizes().tolist() for s in self.images],
            'mean_query_lift': _round(self.mean_query_lift()), 'mean_group_lift': _round(self.mean_group_lift()),
            'mean_cls_lift': None if cl is None else _round(cl),
            'group0_mass': None if self.group0_mass() is None else _round(self.group0_mass()),
            'threshold': self.threshold, 'flag_block': self.flag_block, 'flags': self.flags().tolist(),
        }


def _nanmean(a: np.ndarray, axis) -> np.ndarray:
    with np.errstate(invalid='ignore'):
        ok = ~np.isnan(a)
        return np.where(ok.any(axis), np.nansum(a, axis) / np.maximum(ok.sum(axis), 1), np.nan)


def _round(a: np.ndarray, k: int = 6) -> list:
    """Nested lists for JSON, ``nan`` as ``None``."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isnan(a), None, np.round(a, k)).tolist()


def semantic_interrelation(
        model: nn.Module,
        images: ImagesLike,
        blocks: Optional[Iterable[int]] = None,
        weight: str = 'count',
        *,
        quantiles: Sequence[float] = (1 / 3, 2 / 3),
        threshold: float = 0.5,
        flag_block: int = -1,
        num_images: Optional[int] = None,
        batch_size: int = 16,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
        names: Optional[Sequence[str]] = None,
) -> SemanticResult:
    """SIFT views of the images and the semantic lifts of every chosen block and head.

    Args:
        model: any timm ViT-family model.
        images: any form :func:`vitfree.analysis.inputs.iter_images` takes; tensors must be
            normalised for the model (they are mapped back to pixels for SIFT).
        blocks: blocks to measure (``None`` = all).
        weight: patch mass ``'count'``, ``'response'`` or ``'scale'``.
        quantiles: where groups 1/2/3 split.
        threshold: class-token share on keypoint-free patches above which an image is flagged.
        flag_block: the block whose class token decides the flag (must be among ``blocks``).
        names: names of the images for the flag lists.
    """
    if weight not in WEIGHTS:
        raise ValueError(f'weight must be one of {WEIGHTS}, got {weight!r}')
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f'threshold is a share of attention in [0, 1], got {threshold}')
    mods = attention_modules(model)
    chosen = normalize_blocks(blocks, len(mods))
    fb = normalize_blocks([flag_block], len(mods))[0]
    if fb not in chosen:
        raise ValueError(f'flag_block {flag_block} is not among the measured blocks {chosen}')
    npt = num_prefix_tokens(model)
    cls = class_token_index(model)
    sem: List[SemanticImage] = []
    res: Dict[str, Dict[int, List[torch.Tensor]]] = {}
    cur: Dict[str, torch.Tensor] = {}
    grids: List[Tuple[int, int]] = []

    def on_probs(block, probs, x, grid):
        if block == chosen[0]:
            if grids and tuple(grid) != grids[0]:
                raise ValueError(f'all images must give one patch grid, got {tuple(grid)} after {grids[0]}')
            grids.append(tuple(grid))
            batch = [semantic_image(to_display_image(img, model), grid, weight, quantiles) for img in x]
            sem.extend(batch)
            cur['w'] = torch.as_tensor(np.stack([s.weights for s in batch]), device=probs.device)
            cur['g'] = torch.as_tensor(np.stack([s.groups for s in batch]), device=probs.device)
        n = grid[0] * grid[1]
        out = block_lifts(probs, cur['w'], cur['g'], npt, cls, _allowed_patch_keys(mods[block], n, probs.device))
        out['query_lift_map'] = torch.nanmean(out['query_lift_map'], 1)
        for k, v in out.items():
            res.setdefault(k, {}).setdefault(block, []).append(v.cpu())

    run = attention_pass(model, images, on_probs, chosen, num_images=num_images, batch_size=batch_size,
                         device=device, progress=progress, desc='SIFT lifts')
    stack = {k: torch.stack([torch.cat(v[b]) for b in chosen], 1).numpy() for k, v in res.items()}
    probs = run['logits'].softmax(-1)
    return SemanticResult(
        images=sem, blocks=chosen, num_heads=mods[0].num_heads, grid=grids[0], weight=weight,
        query_lift=stack['query_lift'], query_lift_map=stack['query_lift_map'], group_lift=stack['group_lift'],
        cls_mass=stack.get('cls_mass'), cls_lift=stack.get('cls_lift'),
        predictions=probs.argmax(-1).numpy(), confidence=probs.max(-1).values.numpy(),
        labels=None if run['labels'] is None else run['labels'].numpy(), threshold=float(threshold),
        flag_block=fb, meta={'model': model_name(model), 'data': describe_images(images),
                             'names': list(names) if names is not None else None, 'quantiles': list(quantiles)},
    )


# ---- prompting -----------------------------------------------------------------------------------
@dataclass
class PromptingResult:
    """Predictions with low-semantic patches masked as keys, against random masks of equal size.

    Per image: ``masked`` how many patches were hidden; ``base_pred``/``base_conf`` the unmasked
    prediction and its probability; ``sem_pred``/``sem_conf`` the prediction and the
    probability of the *unmasked* prediction's class after semantic masking; ``rand_changed``
    and ``rand_conf`` the same for the random masks, averaged over ``repeats``.
    """
    by: str
    masked: np.ndarray
    base_pred: np.ndarray
    base_conf: np.ndarray
    sem_pred: np.ndarray
    sem_conf: np.ndarray
    rand_changed: np.ndarray
    rand_conf: np.ndarray
    repeats: int
    meta: Dict[str, object] = field(default_factory=dict)

    def summary(self) -> Dict[str, Dict[str, float]]:
        """Share of images whose prediction changes, and mean confidence change, per masking."""
        return {
            'semantic': {'changed': float((self.sem_pred != self.base_pred).mean()),
                         'conf_change': float((self.sem_conf - self.base_conf).mean())},
            'random': {'changed': float(self.rand_changed.mean()),
                       'conf_change': float((self.rand_conf - self.base_conf).mean())},
            'mean_masked': float(self.masked.mean()),
        }

    def to_dict(self) -> Dict[str, object]:
        return {'by': self.by, 'repeats': self.repeats, 'summary': self.summary(), 'masked': self.masked.tolist(),
                'base_pred': self.base_pred.tolist(), 'sem_pred': self.sem_pred.tolist()}


def _low_semantic(s: SemanticImage, by: str, fraction: float, gen: torch.Generator) -> np.ndarray:
    n = s.mass.shape[0]
    if by == 'group0':
        return s.groups == 0
    k = int(round(fraction * n))
    tie = torch.rand(n, generator=gen).numpy()
    order = np.lexsort((tie, s.mass))  # lowest mass first, ties in random order
    out = np.zeros(n, dtype=bool)
    out[order[:k]] = True
    return out


def _prompt_batch(model: nn.Module, x: torch.Tensor, low: torch.Tensor, repeats: int,
                  gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """One batch of :func:`prompting`: predictions with the ``low`` patches (``(B, N)`` bool) hidden as
    keys, and with as many random patches hidden, ``repeats`` times."""
    n = low.shape[1]
    base = model(x).float().softmax(-1)
    bp = base.argmax(-1)
    with mask_patch_keys(model, low):
        sp = model(x).float().softmax(-1)
    changed = torch.zeros(x.shape[0], device=x.device)
    rconf = torch.zeros(x.shape[0], device=x.device)
    k = low.sum(1)
    for _ in range(repeats):
        order = torch.rand(x.shape[0], n, generator=gen).argsort(1).to(x.device)
        rmask = torch.arange(n, device=x.device)[None] < k[:, None]
        rnd = torch.zeros_like(low).scatter(1, order, rmask)
        with mask_patch_keys(model, rnd):
            rp = model(x).float().softmax(-1)
        changed += (rp.argmax(-1) != bp).float()
        rconf += rp.gather(1, bp[:, None]).squeeze(1)
    return {'masked': k, 'base_pred': bp, 'base_conf': base.gather(1, bp[:, None])[:, 0], 'sem_pred': sp.argmax(-1),
            'sem_conf': sp.gather(1, bp[:, None])[:, 0], 'rand_changed': changed / repeats,
            'rand_conf': rconf / repeats}


def prompting(
        model: nn.Module,
        images: ImagesLike,
        by: str = 'group0',
        *,
        fraction: float = 0.25,
        weight: str = 'count',
        repeats: int = 5,
        seed: int = 0,
        num_images: Optional[int] = None,
        batch_size: int = 16,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
) -> PromptingResult:
    """Re-predict with the low-semantic patches masked out as keys in every block.

    Args:
        by: ``'group0'`` masks the keypoint-free patches; ``'lowest'`` masks the ``fraction`` of
            patches with the lowest semantic mass (equal masses in random order).
        fraction: for ``by='lowest'``, the share of patches to mask.
        weight: patch mass (``'count'``, ``'response'``, ``'scale'``).
        repeats: random masks of the same size per image to compare with.
        seed: seeds the random masks and tie-breaks.

    Masked patches still carry their own token through the network; no query (in any block)
    may attend to them.  Returns a :class:`PromptingResult`.
    """
    if by not in ('group0', 'lowest'):
        raise ValueError(f"by must be 'group0' or 'lowest', got {by!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f'fraction must be in [0, 1], got {fraction}')
    if repeats < 1:
        raise ValueError(f'repeats must be >= 1, got {repeats}')
    gen = torch.Generator().manual_seed(int(seed))
    acc: Dict[str, List[np.ndarray]] = {k: [] for k in ('masked', 'base_pred', 'base_conf', 'sem_pred', 'sem_conf',
                                                        'rand_changed', 'rand_conf')}
    loop = ImageLoop(model, images, 'prompting', batch_size=batch_size, num_images=num_images, device=device,
                     progress=progress)
    with loop:
        for x, _ in loop:
            sem = [semantic_image(to_display_image(img, model), loop.grid, weight) for img in x]
            low = torch.as_tensor(np.stack([_low_semantic(si, by, fraction, gen) for si in sem]), device=x.device)
            for key, val in _prompt_batch(model, x, low, repeats, gen).items():
                acc[key].append(val.cpu().numpy())
    cat = {k: np.concatenate(v) for k, v in acc.items()}
    return PromptingResult(by=by, repeats=repeats, meta={'weight': weight, 'fraction': fraction, 'seed': seed},
                           **cat)


# ---- keypoint-guided masking -----------------------------------------------------------------------
def _as_mass(mass) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(mass) if not torch.is_tensor(mass) else mass).double()
    if m.dim() == 1:
        m = m.unsqueeze(0)
    if m.dim() != 2 or m.shape[1] < 1:
        raise ValueError(f'mass must be (N,) or (B, N) per-patch semantic mass, got shape {tuple(m.shape)}')
    if bool((m < 0).any()) or not bool(torch.isfinite(m).all()):
        raise ValueError('mass must be finite and non-negative')
    return m


def _num_visible(n: int, mask_ratio: float) -> int:
    if not 0.0 <= float(mask_ratio) <= 1.0:
        raise ValueError(f'mask_ratio must be in [0, 1], got {mask_ratio}')
    return int(round(n * (1.0 - float(mask_ratio))))


def visible_probabilities(
        mass,
        mask_ratio: float = 0.75,
        temperature: float = 1.0,
        eps: float = 1.0,
) -> torch.Tensor:
    """The probability that each patch stays visible under :func:`keypoint_guided_masks`:
    ``k * q_p / sum q`` with ``q_p = (c_p + eps) ** temperature`` and ``k`` visible patches,
    where patches that would exceed 1 are capped at 1 and the rest share the remaining
    visible slots in the same proportions.  ``(B, N)`` float64, each row sums to ``k``."""
    m = _as_mass(mass)
    if eps < 0:
        raise ValueError(f'eps must be >= 0, got {eps}')
    if temperature < 0 and eps <= 0:
        raise ValueError(f'a negative temperature ({temperature}) needs eps > 0 (zero mass would be infinite)')
    k = _num_visible(m.shape[1], mask_ratio)
    q = (m + eps) ** float(temperature)
    pi = torch.zeros_like(q)
    for r in range(q.shape[0]):
        fixed = torch.zeros(q.shape[1], dtype=torch.bool)
        left = k
        while left > 0:
            free = ~fixed
            qf = q[r, free]
            share = qf / qf.sum() if float(qf.sum()) > 0 else torch.full_like(qf, 1.0 / qf.numel())
            p = left * share
            over = p >= 1.0
            if not bool(over.any()):
                pi[r, free] = p
                break
            idx = free.nonzero().squeeze(1)[over]
            pi[r, idx] = 1.0
            fixed[idx] = True
            left -= int(over.sum())
    return pi


def keypoint_guided_masks(
        mass,
        mask_ratio: float = 0.75,
        temperature: float = 1.0,
        eps: float = 1.0,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Masks for masked-image pre-training that favour keeping semantic patches visible.

    Args:
        mass: per-patch semantic mass ``c_p``, ``(N,)`` or ``(B, N)`` (e.g. ``SemanticImage.mass``
            or keypoint counts).
        mask_ratio: share of patches masked; exactly ``round(N * (1 - mask_ratio))`` patches stay
            visible in every mask.
        temperature: ``0`` gives uniform random masking; larger values keep high-mass patches
            visible more often (negative values prefer low-mass patches).
        eps: added to the mass before the power, so keypoint-free patches keep a chance.
        generator: a ``torch.Generator`` for reproducible masks.

    Returns ``(B, N)`` bool, ``True`` = masked (hidden), as in MAE.  Patch ``p`` stays visible
    with exactly the probability :func:`visible_probabilities` gives (``k * q_p / sum q`` when
    no patch reaches 1): the visible set is drawn by systematic sampling over a random order
    of the patches.
    """
    pi = visible_probabilities(mass, mask_ratio, temperature, eps)
    b, n = pi.shape
    k = int(round(float(pi[0].sum()))) if n else 0
    masked = torch.ones(b, n, dtype=torch.bool)
    if k == 0:
        return masked
    perm = torch.rand(b, n, generator=generator, dtype=torch.float64).argsort(1)
    cum = pi.gather(1, perm).cumsum(1)
    u = torch.rand(b, 1, generator=generator, dtype=torch.float64)
    points = u + torch.arange(k, dtype=torch.float64)[None]
    pos = torch.searchsorted(cum, points, right=True).clamp_(max=n - 1)
    chosen = perm.gather(1, pos)
    masked.scatter_(1, chosen, False)
    short = (~masked).sum(1) < k  # rounding in the cumulative sum picked a patch twice (rare)
    for r in short.nonzero().squeeze(1).tolist():
        free = masked[r].nonzero().squeeze(1)
        need = k - int((~masked[r]).sum())
        top = free[torch.multinomial(pi[r, free].float() + 1e-12, need, generator=generator)]
        masked[r, top] = False
    return masked
