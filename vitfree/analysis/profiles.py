"""Attention strength by hop distance, and head entropy.

For a head, the *hop distance* between two patches is the Chebyshev distance of their grid
positions, ``max(|dy|, |dx|)``.  The head's *strength* at hop ``n`` is its post-softmax
attention averaged over the patch pairs that lie ``n`` hops apart; normalised over ``n`` it
becomes a distribution whose entropy (natural log) says how local the head is: ``0`` for a
head that only looks at the query patch itself, ``ln(max(H, W))`` for a head without any
distance preference (uniform attention).

The averaging matters.  With ``average='pairs'`` every (query, key) pair at distance ``n``
counts once; with ``average='queries'`` each query's own mean over its keys at distance ``n``
is taken first and those means are averaged over the queries that have such keys.  Either
way uniform attention gives the same strength at every hop, so its entropy is
``ln(max(H, W))``.  Summing instead of averaging would not: far hops have fewer pairs.

    prof = distance_profiles(model, images)           # any timm ViT-family model
    prof.mean_strength        # (blocks, heads, hops) dataset mean
    prof.entropy              # (images, blocks, heads) per-image head entropies
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .capture import attention_modules, attention_pass, normalize_blocks, num_prefix_tokens
from .inputs import ImagesLike

__all__ = [
    'AVERAGES', 'DistanceProfiles', 'hop_distances', 'hop_strength', 'head_entropy', 'distance_profiles',
]

AVERAGES = ('pairs', 'queries')


# ---- hop distances and strengths --------------------------------------------------------------
def hop_distances(grid: Sequence[int], device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """``(N, N)`` Chebyshev distances between the patches of an ``H x W`` grid (row-major)."""
    if len(grid) != 2 or min(int(g) for g in grid) < 1:
        raise ValueError(f'grid must be (H, W) with positive sizes, got {tuple(grid)}')
    h, w = int(grid[0]), int(grid[1])
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing='ij')
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return torch.maximum((ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs())


def hop_strength(
        attn: torch.Tensor,
        grid: Sequence[int],
        num_prefix_tokens: int = 0,
        average: str = 'pairs',
) -> torch.Tensor:
    """Mean attention per hop distance.

    Args:
        attn: post-softmax attention ``(..., T, T)`` with ``T = num_prefix_tokens + H*W``
            (queries are rows); only the patch-to-patch part is used, as it is (not rescaled).
        grid: the patch grid ``(H, W)``.
        num_prefix_tokens: leading class/register tokens to skip.
        average: ``'pairs'`` (mean over all patch pairs at each hop) or ``'queries'`` (mean per
            query first, then over the queries that have keys at that hop).

    Returns:
        ``(..., max(H, W))`` strengths, hop ``0`` first.
    """
    if average not in AVERAGES:
        raise ValueError(f'average must be one of {AVERAGES}, got {average!r}')
    h, w = int(grid[0]), int(grid[1])
    n = h * w
    p = int(num_prefix_tokens)
    if attn.dim() < 2 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] != p + n:
        raise ValueError(f'attention of shape {tuple(attn.shape)} does not fit {p} prefix tokens and a {h}x{w} grid '
                         f'(expected (..., {p + n}, {p + n}))')
    a = attn[..., p:, p:].float()
    lead = a.shape[:-2]
    hops = max(h, w)
    dist = hop_distances((h, w), a.device)
    if average == 'pairs':
        flat = a.reshape(-1, n * n)
        sums = torch.zeros(flat.shape[0], hops, device=a.device).index_add_(1, dist.reshape(-1), flat)
        counts = torch.bincount(dist.reshape(-1), minlength=hops).to(sums)
        return (sums / counts).reshape(*lead, hops)
    flat = a.reshape(-1, n, n)
    idx = dist.unsqueeze(0).expand(flat.shape[0], n, n)
    sums = torch.zeros(flat.shape[0], n, hops, device=a.device).scatter_add_(2, idx, flat)
    counts = torch.zeros(n, hops, device=a.device).scatter_add_(1, dist, torch.ones(n, n, device=a.device))
    has = counts > 0
    per_query = sums / counts.clamp_min(1)
    out = (per_query * has).sum(1) / has.sum(0).clamp_min(1)
    return out.reshape(*lead, hops)


def head_entropy(strength: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Entropy (natural log) of the hop distribution ``p_n = s_n / sum_m s_m`` over the last
    dim.  In ``[0, ln(hops)]``; ``nan`` where a head puts no attention on patches at all."""
    s = strength.float().clamp_min(0) + eps
    total = s.sum(-1, keepdim=True)
    p = s / total
    ent = 0.0 - (torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p))).sum(-1)  # no -0.0
    return torch.where(total.squeeze(-1) > 0, ent, torch.full_like(ent, float('nan')))


# ---- over a data set ---------------------------------------------------------------------------
@dataclass
class DistanceProfiles:
    """Hop strengths and head entropies of a model over a set of images.

    ``strength[i, b, h, n]`` is image ``i``'s strength of head ``h`` of the ``b``-th analysed
    block (``blocks[b]``) at hop ``n``; ``entropy[i, b, h]`` its head entropy.
    """
    strength: np.ndarray
    entropy: np.ndarray
    blocks: List[int]
    grid: Tuple[int, int]
    average: str = 'pairs'
    num_prefix_tokens: int = 0
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.strength.shape[0])

    @property
    def hops(self) -> int:
        return int(self.strength.shape[-1])

    @property
    def mean_strength(self) -> np.ndarray:
        """``(blocks, heads, hops)``: strengths averaged over images."""
        return self.strength.mean(0)

    @property
    def mean_entropy(self) -> np.ndarray:
        """``(blocks, heads)``: per-image entropies averaged over images."""
        return np.nanmean(self.entropy, 0) if self.num_images else self.entropy.mean(0)

    @property
    def entropy_of_mean(self) -> np.ndarray:
        """``(blocks, heads)``: entropy of the dataset-mean hop profile."""
        return head_entropy(torch.from_numpy(self.mean_strength)).numpy()

    def hop_distribution(self) -> np.ndarray:
        """``(images, blocks, heads, hops)``: strengths normalised to sum 1 over hops."""
        s = self.strength
        return s / np.where(s.sum(-1, keepdims=True) > 0, s.sum(-1, keepdims=True), 1.0)

    def to_dict(self) -> Dict[str, object]:
        """Plain-Python summary (dataset means) for JSON."""
        return {
            'blocks': list(self.blocks), 'grid': list(self.grid), 'average': self.average,
            'num_images': self.num_images, 'mean_strength': self.mean_strength.round(6).tolist(),
            'mean_entropy': np.round(self.mean_entropy, 6).tolist(),
            'entropy_of_mean': np.round(self.entropy_of_mean, 6).tolist(),
            'max_entropy': float(np.log(self.hops)),
        }


def distance_profiles(
        model: nn.Module,
        images: ImagesLike,
        blocks: Optional[Iterable[int]] = None,
        average: str = 'pairs',
        *,
        num_images: Optional[int] = None,
        batch_size: int = 16,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
) -> DistanceProfiles:
    """Hop strengths and head entropies of every chosen block and head, per image.

    Works on any timm ViT-family model: class and register tokens are left out, and the
    windows of a WinfT simply show up as zero attention outside them.  ``images`` takes every
    form :func:`vitfree.analysis.inputs.iter_images` does (tensor, ``(tensor, labels)``,
    DataLoader, Dataset, list of images or paths, folder); all must give one patch grid.
    """
    if average not in AVERAGES:
        raise ValueError(f'average must be one of {AVERAGES}, got {average!r}')
    depth = len(attention_modules(model))
    chosen = normalize_blocks(blocks, depth)
    p = num_prefix_tokens(model)
    per_block: Dict[int, List[torch.Tensor]] = {b: [] for b in chosen}
    grids: List[Tuple[int, int]] = []

    def on_probs(block, probs, x, grid):
        if block == chosen[0]:
            if grids and tuple(grid) != grids[0]:
                raise ValueError(f'all images must give one patch grid, got {tuple(grid)} after {grids[0]}; '
                                 f'resize them to one size')
            grids.append(tuple(grid))
        per_block[block].append(hop_strength(probs, grid, p, average).cpu())

    out = attention_pass(model, images, on_probs, chosen, num_images=num_images, batch_size=batch_size,
                         device=device, progress=progress, desc='distance profiles')
    strength = torch.stack([torch.cat(per_block[b]) for b in chosen], 1)  # (images, blocks, heads, hops)
    entropy = head_entropy(strength)
    return DistanceProfiles(strength.numpy(), entropy.numpy(), chosen, grids[0], average, p,
                            meta={'predictions': out['logits'].argmax(-1).tolist()})
