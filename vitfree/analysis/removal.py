"""Patch removal: how accuracy falls as the least important patches are hidden.

Patches are ranked per image by an importance score, the lowest fraction is masked as keys
in every block (no query may attend to them - their tokens still flow through the residual
stream, they just stop informing anyone else), and top-1 accuracy is recorded against the
fraction removed, one curve per score.  Accuracy is measured against the labels; images without
labels are scored against the model's own unmasked prediction (agreement), as ``vitfree analyze``
does, and :attr:`RemovalResult.against` says which:

``interaction``
    column sums of the interaction map ``P`` averaged over blocks - how much the other
    patches draw on this one.  Measured per image from the attention (one extra forward), or
    taken from a dataset-level :class:`~vitfree.analysis.interaction.InteractionResult`
    passed as ``interaction=``.
``sift``
    the patch's share of SIFT keypoints (OpenCV, default parameters), detected on the image as
    the model sees it (:func:`vitfree.analysis.semantic.patch_semantic_mass`, ``weight='count'``).
``random``
    a random ranking (seeded).

Equal scores are ordered randomly (seeded), so e.g. the many keypoint-free patches of the
``sift`` score are not removed in raster order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .capture import attention_modules, attention_override, mask_patch_keys, num_prefix_tokens, row_normalize
from .inputs import ImageLoop, ImagesLike, describe_images, model_name, patch_grid, to_display_image
from .interaction import InteractionResult
from .semantic import patch_semantic_mass

__all__ = ['patch_removal', 'RemovalResult', 'mask_patch_keys', 'patch_scores', 'SCORES', 'DEFAULT_FRACTIONS']

SCORES = ('interaction', 'sift', 'random')
DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class RemovalResult:
    """Accuracy against the fraction of patches removed; ``accuracy[score][k]`` belongs to
    ``fractions[k]``, and ``removed[k]`` is the number of patches that fraction hides."""
    fractions: List[float]
    removed: List[int]
    accuracy: Dict[str, List[float]]
    num_images: int
    grid: Tuple[int, int]
    model: Optional[str] = None
    data: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    against: str = 'labels'  # or 'predictions' (the unmasked model's), or 'labels and predictions'

    def to_dict(self) -> Dict[str, Any]:
        return {'fractions': self.fractions, 'removed': self.removed, 'accuracy': self.accuracy,
                'num_images': self.num_images, 'grid': list(self.grid), 'model': self.model, 'data': self.data,
                'against': self.against}

    def __repr__(self) -> str:
        means = ', '.join(f'{s} {100 * float(np.mean(a)):.1f}%' for s, a in self.accuracy.items())
        return (f'RemovalResult({self.num_images} images, grid {self.grid[0]}x{self.grid[1]}, '
                f'{len(self.fractions)} fractions, against {self.against}; mean accuracy over the curve: {means})')

    def format_table(self) -> str:
        scores = list(self.accuracy)
        lines = [f'{"removed":>8}  ' + '  '.join(f'{s:>11}' for s in scores)]
        for k, f in enumerate(self.fractions):
            lines.append(f'{100 * f:>7.0f}%  ' + '  '.join(f'{100 * self.accuracy[s][k]:>10.1f}%' for s in scores))
        return '\n'.join(lines)


def _attention_importance(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per image: column sums of the row-normalised head-mean attention, averaged over blocks."""
    npt = num_prefix_tokens(model)
    depth = len(attention_modules(model))
    total: List[torch.Tensor] = []

    def on_probs(block: int, probs: torch.Tensor) -> None:
        p = row_normalize(probs[:, :, npt:, npt:].float().mean(1))
        total.append(p.sum(1))

    with torch.no_grad(), attention_override(model, None, probs_fn=on_probs):
        model(x)
    return torch.stack(total).sum(0) / depth


def patch_scores(model: nn.Module, x: torch.Tensor, score: str, *,
                 interaction: Optional[InteractionResult] = None) -> torch.Tensor:
    """Importance ``(B, N)`` of every patch of every image in the batch for one score kind
    (``'interaction'``, ``'sift'``, ``'random'``: zeros, the ranking then comes from the tie-break)."""
    grid = patch_grid(model, x.shape[-2:])
    n = grid[0] * grid[1]
    if score == 'interaction':
        if interaction is not None:
            if tuple(interaction.grid) != grid:
                raise ValueError(f'interaction maps are for grid {interaction.grid}, images give {grid}')
            return interaction.importance().to(x.device).expand(x.shape[0], n)
        return _attention_importance(model, x)
    if score == 'sift':
        out = [patch_semantic_mass(to_display_image(img, model), grid) for img in x]
        return torch.as_tensor(np.stack(out), dtype=torch.float32, device=x.device)
    if score == 'random':
        return torch.zeros(x.shape[0], n, device=x.device)
    raise ValueError(f'unknown patch score {score!r}; choose from {SCORES}')


def _lowest(scores: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per row, patch indices from least to most important; equal scores in random order."""
    b, n = scores.shape
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)]).to(scores.device)
    order = torch.argsort(scores.gather(1, perm), dim=1, stable=True)
    return perm.gather(1, order)


def _remove_and_count(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scores: Sequence[str],
                      fractions: Sequence[float], grid: Tuple[int, int], gen: torch.Generator,
                      interaction: Optional[InteractionResult], correct: Dict[str, List[int]]) -> None:
    """One batch: for every score and fraction, hide the lowest-ranked patches as keys and add the
    images whose prediction still equals ``y`` to ``correct[score][k]``."""
    n = grid[0] * grid[1]
    for sc in scores:
        order = _lowest(patch_scores(model, x, sc, interaction=interaction), gen)
        for k, f in enumerate(fractions):
            removed = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)
            removed.scatter_(1, order[:, :int(round(f * n))], True)
            with mask_patch_keys(model, removed):
                pred = model(x).argmax(1)
            correct[sc][k] += int((pred == y).sum())


def patch_removal(
        model: nn.Module,
        images: ImagesLike,
        scores: Optional[Sequence[str]] = None,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        *,
        num_images: Optional[int] = None,
        batch_size: int = 16,
        interaction: Optional[InteractionResult] = None,
        seed: int = 0,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
) -> RemovalResult:
    """Top-1 accuracy against the fraction of patches masked as keys in every block.

    Args:
        model: a timm ViT-family classifier.
        images: images, best with labels (see :func:`vitfree.analysis.inputs.iter_images`);
            without labels, accuracy is agreement with the model's own unmasked prediction.
        scores: any of ``'interaction'``, ``'sift'``, ``'random'``; default: all three, ``sift``
            only when OpenCV is installed.
        fractions: fractions of the patches to remove, each in ``[0, 1]``; ``round(f * N)``
            patches are hidden.
        interaction: use this dataset-level map for the ``interaction`` score instead of each
            image's own attention.
        seed: seeds the ``random`` ranking and the tie-break between equal scores.

    Returns a :class:`RemovalResult`.
    """
    if scores is None:
        try:
            import cv2  # noqa: F401
            scores = list(SCORES)
        except ImportError:
            scores = ['interaction', 'random']
    scores = [scores] if isinstance(scores, str) else list(scores)
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise ValueError(f'scores must be a non-empty list drawn from {SCORES}, got {scores!r}')
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f'fractions must be a non-empty list of numbers in [0, 1], got {fractions!r}')
    gen = torch.Generator().manual_seed(int(seed))
    correct = {sc: [0] * len(fractions) for sc in scores}
    against = set()
    loop = ImageLoop(model, images, 'patch removal', batch_size=batch_size, num_images=num_images, device=device,
                     progress=progress)
    with loop:
        for x, y in loop:
            against.add('labels' if y is not None else 'predictions')
            if y is None:  # no labels: agreement with the model's own unmasked prediction
                y = model(x).argmax(1)
            _remove_and_count(model, x, y, scores, fractions, loop.grid, gen, interaction, correct)
    count, grid = loop.count, loop.grid
    n = grid[0] * grid[1]
    return RemovalResult(
        fractions=fractions, removed=[int(round(f * n)) for f in fractions],
        accuracy={s: [c / count for c in correct[s]] for s in scores}, num_images=count, grid=grid,
        model=model_name(model), data=describe_images(images), extra={'seed': seed},
        against=' and '.join(sorted(against)),
    )
