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

Images can be given in several forms, see :func:`vitfree.analysis.inputs.iter_images`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .capture import (Recorder, attention_modules, attention_override, capture_block_io, normalize_blocks, rerun_block,
                      num_prefix_tokens, row_normalize, zero_empty_rows)
from .inputs import ImageLoop, ImagesLike, describe_images, model_name, resolve_targets

__all__ = ['interaction', 'InteractionResult', 'ESTIMATORS', 'row_normalize']

ESTIMATORS = ('attention', 'attribution', 'ablation')


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
    depth: Optional[int] = None  # blocks of the model (negative block indices count from its end)

    @property
    def blocks(self) -> List[int]:
        return sorted(self.maps)

    def __getitem__(self, block: int) -> torch.Tensor:
        if self.depth is not None and isinstance(block, int) and -self.depth <= block < 0:
            block += self.depth
        if block not in self.maps:
            raise KeyError(f'block {block} was not measured (measured blocks: {self.blocks})')
        return self.maps[block]

    def __repr__(self) -> str:
        shape = tuple(self.maps[self.blocks[0]].shape) if self.maps else ()
        where = f', data={self.data!r}' if self.data else ''
        return (f'InteractionResult({self.estimator}, {len(self.maps)} block(s) {_span(self.blocks)}, grid '
                f'{self.grid[0]}x{self.grid[1]}, maps {shape} per block, {self.num_images} image(s){where})')

    def head_mean(self, block: int) -> torch.Tensor:
        """The ``(N, N)`` map of a block (per-head maps averaged over heads)."""
        m = self[block]
        return m.mean(0) if m.dim() == 3 else m

    def importance(self, blocks: Optional[Iterable[int]] = None) -> torch.Tensor:
        """How much each patch matters to the others: column sums of ``P`` averaged over the
        chosen blocks (all measured ones by default), shape ``(N,)``; they sum to ``N``."""
        blocks = self.blocks if blocks is None else list(blocks)
        return torch.stack([self.head_mean(b).sum(0) for b in blocks]).mean(0)


def _span(blocks: List[int]) -> str:
    """``[0..5]`` for consecutive block indices, else the list."""
    if blocks and blocks == list(range(blocks[0], blocks[-1] + 1)) and len(blocks) > 2:
        return f'[{blocks[0]}..{blocks[-1]}]'
    return str(blocks)


# ---- the estimators --------------------------------------------------------------------------
def _accumulate_attention(model, x, blocks, acc, npt, per_head) -> None:
    def on_probs(block: int, probs: torch.Tensor) -> None:
        a = probs[:, :, npt:, npt:].double()
        a = a.sum(0) if per_head else a.mean(1).sum(0)
        acc[block] = a if block not in acc else acc[block] + a

    with torch.no_grad(), attention_override(model, blocks, probs_fn=on_probs):
        model(x)


def _accumulate_attribution(model, x, y, blocks, acc, npt, per_head, target, max_bytes) -> None:
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

    The key is removed through the ``attn_mask`` of the block's attention layer, the block rerun with
    the other arguments the model gave it (a rotary embedding, a shared position bias).  Every call carries an
    unablated copy of the image first, so the reference output comes from the very same batched
    computation and keys outside a query's window give exactly 0.  The block runs the layer's
    explicit-softmax path, where a query left with no key gets a zero attention output.
    """
    with torch.no_grad(), capture_block_io(model, blocks) as io:
        model(x)
    keys_per_call = max(1, chunk - 1)
    with torch.no_grad():
        for b in blocks:
            xin = io[b]['input']  # (B, T, C) tokens; rerun_block gives the block its own layout and arguments
            B, T, C = xin.shape
            n = T - npt
            total = acc.get(b)
            if total is None:
                total = torch.zeros(n, n, dtype=torch.float64, device=xin.device)
            with attention_override(model, [b], probs_fn=zero_empty_rows):
                for img in range(B):
                    for s in range(0, n, keys_per_call):
                        js = torch.arange(s, min(n, s + keys_per_call), device=xin.device)
                        c = js.numel()
                        allowed = torch.ones(c + 1, 1, 1, T, dtype=torch.bool, device=xin.device)
                        allowed[torch.arange(1, c + 1, device=xin.device), 0, 0, npt + js] = False
                        z = rerun_block(model, b, io[b], xin[img:img + 1].expand(c + 1, T, C), allowed)[:, npt:]
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
        images: see :func:`vitfree.analysis.inputs.iter_images` (tensor batch, ``(tensor, labels)``, DataLoader, Dataset,
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
            :class:`~vitfree.analysis.capture.Recorder`).
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
    acc: Dict[int, torch.Tensor] = {}
    loop = ImageLoop(model, images, f'interaction ({estimator})', batch_size=batch_size, num_images=num_images,
                     device=device, progress=progress)
    with loop:
        for x, y in loop:
            if estimator == 'attention':
                _accumulate_attention(model, x, chosen, acc, npt, per_head)
            elif estimator == 'attribution':
                _accumulate_attribution(model, x, y, chosen, acc, npt, per_head, target, max_bytes)
            else:
                _accumulate_ablation(model, x, chosen, acc, npt, ablation_batch)
    count, grid = loop.count, loop.grid
    maps = {b: row_normalize(acc[b] / count).float().cpu() for b in chosen}
    return InteractionResult(
        maps=maps, grid=grid, estimator=estimator, num_images=count, num_prefix_tokens=npt, per_head=per_head,
        target=(str(target) if estimator == 'attribution' else None),
        data=data if data is not None else describe_images(images), model=model_name(model), depth=depth,
    )
