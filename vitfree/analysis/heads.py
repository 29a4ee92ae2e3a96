"""Head importance: partial pruning of single heads, and a gradient gate score.

Pruning multiplies one head's post-softmax attention by a 0/1 mask over its ``T x T``
entries (``T`` = prefix tokens + patches; the result is not renormalised unless asked) and
records how the softmax probability of the target class moves.  Six modes say which entries
are zeroed:

====  ==========================  ===================================================
mode  name                        zeroed entries ``(query, key)``
====  ==========================  ===================================================
1     ``none``                    nothing (a control: the prediction must not change)
2     ``head``                    all of them (the head's output becomes zero)
3     ``prefix``                  every entry whose query or key is a prefix token
4     ``patch-patch``             patch queries on patch keys
5     ``prefix-patch``            prefix on patch and patch on prefix (the cross terms)
6     ``prefix-prefix``           prefix queries on prefix keys
====  ==========================  ===================================================

Models without prefix tokens (global average pooling, no class token) have nothing to zero
in modes 3, 5 and 6, which then equal mode 1.

The masked forwards are batched: every (image, block, head, mode) combination is one row of a
batch in which the image is repeated, and the attention hook masks a different head per row,
so one forward covers ``prune_batch`` masked heads.

The *gate score* of a head is ``E |dLoss/dg|`` for a multiplicative gate ``g = 1`` on the
head's output, ``Loss`` being the cross-entropy of the target class.  Scaling a head's
attention by ``g`` scales its output ``A V`` by ``g``, so the gate sits on the attention.

    imp = head_importance(model, images)      # any timm ViT-family model
    imp.prob_drop()          # (modes, blocks, heads) mean drop of the target probability
    imp.accuracy_drop()      # (modes, blocks, heads)
    imp.gate_score()         # (blocks, heads)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import attention_modules, attention_override, capture_block_io, normalize_blocks, num_prefix_tokens
from .inputs import ImageLoop, ImagesLike, describe_images, model_name, resolve_targets

__all__ = ['MODES', 'MODE_NAMES', 'HeadImportance', 'pruning_keep_mask', 'prune_heads', 'gate_gradients',
           'head_importance']

MODES = (1, 2, 3, 4, 5, 6)
MODE_NAMES = {1: 'none', 2: 'head', 3: 'prefix', 4: 'patch-patch', 5: 'prefix-patch', 6: 'prefix-prefix'}


def _check_modes(modes: Iterable[int]) -> List[int]:
    modes = [modes] if isinstance(modes, int) else list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f'pruning modes must be a non-empty list drawn from {MODES} '
                         f'({", ".join(f"{k}={v}" for k, v in MODE_NAMES.items())}), got {modes!r}')
    return list(dict.fromkeys(int(m) for m in modes))


def pruning_keep_mask(
        mode: int,
        num_tokens: int,
        num_prefix_tokens: int,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``(T, T)`` 0/1 multiplier of one pruning mode: ``0`` on the entries it zeroes."""
    (mode,) = _check_modes([mode])
    t, p = int(num_tokens), int(num_prefix_tokens)
    if not 0 <= p <= t:
        raise ValueError(f'num_prefix_tokens must lie in 0..{t} for {t} tokens, got {p}')
    is_prefix = torch.zeros(t, dtype=torch.bool, device=device)
    is_prefix[:p] = True
    q, k = is_prefix[:, None], is_prefix[None, :]
    zero = {
        1: torch.zeros(t, t, dtype=torch.bool, device=device),
        2: torch.ones(t, t, dtype=torch.bool, device=device),
        3: q | k,
        4: ~q & ~k,
        5: q ^ k,
        6: q & k,
    }[mode]
    return (~zero).to(dtype)


def _prune_args(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, modes: Sequence[int],
                blocks: Optional[Iterable[int]], heads: Optional[Sequence[int]], prune_batch: int
                ) -> Tuple[List[int], List[int], List[int]]:
    """The checked modes, blocks and heads of :func:`prune_heads`; errors name the bad value."""
    modes = _check_modes(modes)
    mods = attention_modules(model)
    chosen = normalize_blocks(blocks, len(mods))
    num_heads = mods[0].num_heads
    heads = list(range(num_heads)) if heads is None else [int(h) for h in heads]
    if not heads or any(not 0 <= h < num_heads for h in heads):
        raise ValueError(f'heads must be a non-empty list of indices in 0..{num_heads - 1}, got {heads!r}')
    if prune_batch < 1:
        raise ValueError(f'prune_batch must be >= 1, got {prune_batch}')
    if x.dim() != 4 or targets.shape != (x.shape[0],):
        raise ValueError(f'expected images (B, C, H, W) and targets (B,), got {tuple(x.shape)} and '
                         f'{tuple(targets.shape)}')
    return modes, chosen, heads


def prune_heads(
        model: nn.Module,
        x: torch.Tensor,
        targets: torch.Tensor,
        modes: Sequence[int] = MODES,
        blocks: Optional[Iterable[int]] = None,
        heads: Optional[Sequence[int]] = None,
        *,
        renormalize: bool = False,
        prune_batch: int = 64,
        bar=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Target-class probability and prediction with each head pruned in each mode.

    Args:
        model: a timm ViT-family classifier (run as it is: put it in eval mode yourself).
        x: images ``(B, C, H, W)``, normalised for the model.
        targets: ``(B,)`` class index per image whose probability is recorded.
        modes: pruning modes (see the module docstring).
        blocks: blocks whose heads are pruned (``None`` = all).
        heads: head indices to prune in each block (``None`` = all).
        renormalize: rescale each masked attention row to sum 1 again (rows left all zero stay zero).
        prune_batch: rows (masked forwards) per batched forward.
        bar: an optional progress bar, advanced by the number of rows done.

    Returns:
        ``prob`` and ``pred``, each ``(B, modes, blocks, heads)``: the softmax probability of the
        target class and the arg-max class with that head pruned in that mode.
    """
    modes, chosen, heads = _prune_args(model, x, targets, modes, blocks, heads, prune_batch)
    npt = num_prefix_tokens(model)
    device = x.device
    B, M, L, Hh = x.shape[0], len(modes), len(chosen), len(heads)
    prob = torch.empty(B, M, L, Hh, device=device)
    pred = torch.empty(B, M, L, Hh, dtype=torch.long, device=device)
    # rows of one block: every (image, mode, head), row-major
    rows = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(M), torch.arange(Hh), indexing='ij'),
                       -1).reshape(-1, 3).to(device)
    head_index = torch.as_tensor(heads, device=device)
    keep_cache: Dict[int, torch.Tensor] = {}
    current: Dict[str, torch.Tensor] = {}

    def keep_masks(t: int) -> torch.Tensor:
        if t not in keep_cache:
            keep_cache[t] = torch.stack([pruning_keep_mask(m, t, npt, device) for m in modes])
        return keep_cache[t]

    def probs_fn(block: int, probs: torch.Tensor) -> torch.Tensor:
        r = torch.arange(probs.shape[0], device=probs.device)
        hsel = current['head']
        masked = probs[r, hsel] * keep_masks(probs.shape[-1]).to(probs.dtype)[current['mode']]
        if renormalize:
            masked = masked / masked.sum(-1, keepdim=True).clamp_min(torch.finfo(masked.dtype).tiny)
        probs = probs.clone()
        probs[r, hsel] = masked
        return probs

    with torch.no_grad():
        inputs = _block_inputs(model, x, chosen)  # None: run every masked forward from the start
        for li, block in enumerate(chosen):
            with attention_override(model, [block], probs_fn=probs_fn):
                for s in range(0, rows.shape[0], prune_batch):
                    r = rows[s:s + prune_batch]
                    img, mode, head = r[:, 0], r[:, 1], r[:, 2]
                    current.update(head=head_index[head], mode=mode)
                    if inputs is None:
                        logits = model(x[img]).float()
                    else:
                        logits = _resume(model, block, inputs[block][img]).float()
                    prob[img, mode, li, head] = logits.softmax(-1).gather(1, targets[img].unsqueeze(1)).squeeze(1)
                    pred[img, mode, li, head] = logits.argmax(-1)
                    if bar is not None:
                        bar.update(int(r.shape[0]))
    return prob, pred


def _resume(model: nn.Module, block: int, h: torch.Tensor) -> torch.Tensor:
    """Logits from the input ``h`` of ``model.blocks[block]`` on (timm ViT forward order)."""
    for blk in list(model.blocks)[block:]:
        h = blk(h)
    return model.forward_head(model.norm(h))


def _block_inputs(model: nn.Module, x: torch.Tensor, blocks: List[int]) -> Optional[Dict[int, torch.Tensor]]:
    """The inputs of the chosen blocks for ``x``, when the model's output can be recomputed from a
    block's input (checked once against the full forward); otherwise ``None``.  Pruning a head
    of block ``l`` leaves blocks ``0..l-1`` unchanged, so their work need not be redone."""
    if not (hasattr(model, 'norm') and hasattr(model, 'forward_head')):
        return None
    with capture_block_io(model, blocks) as io:
        ref = model(x)
    try:
        again = _resume(model, blocks[0], io[blocks[0]]['input'])
    except Exception:  # noqa: BLE001 - any failure just means: run from the start
        return None
    if again.shape != ref.shape or not torch.allclose(again, ref, rtol=1e-4, atol=1e-5):
        return None
    return {b: io[b]['input'] for b in blocks}


def gate_gradients(
        model: nn.Module,
        x: torch.Tensor,
        targets: torch.Tensor,
        blocks: Optional[Iterable[int]] = None,
) -> torch.Tensor:
    """``|dLoss_b / dg_{b, l, h}|`` per image ``b``, block ``l`` and head ``h``: the gradient of the
    cross-entropy of the target class with respect to a gate ``g = 1`` on each head's output.
    Returns ``(B, blocks, heads)`` (detached).  The model's parameters get no ``.grad``."""
    mods = attention_modules(model)
    chosen = normalize_blocks(blocks, len(mods))
    pos = {b: i for i, b in enumerate(chosen)}
    gates = torch.ones(x.shape[0], len(chosen), mods[0].num_heads, device=x.device, requires_grad=True)

    def probs_fn(block: int, probs: torch.Tensor) -> torch.Tensor:
        return probs * gates[:, pos[block], :, None, None].to(probs.dtype)

    with torch.enable_grad(), attention_override(model, chosen, probs_fn=probs_fn):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), targets.to(logits.device), reduction='sum')
        (grad,) = torch.autograd.grad(loss, gates)
    return grad.detach().abs()


@dataclass
class HeadImportance:
    """Results of :func:`head_importance` for ``I`` images.

    ``prob[i, m, b, h]`` / ``pred[i, m, b, h]``: target probability / predicted class of image
    ``i`` with head ``heads[h]`` of block ``blocks[b]`` pruned in mode ``modes[m]``;
    ``base_prob`` / ``base_pred``: the same without pruning; ``gate``: ``(I, blocks, heads)``
    absolute gate gradients (``None`` when not computed).  Accuracy is measured against
    ``labels`` when the images had labels, otherwise against ``targets`` (with
    ``target='predicted'`` that is the unpruned prediction, so the accuracy drop is the share
    of images whose prediction changes).
    """
    modes: List[int]
    blocks: List[int]
    heads: List[int]
    prob: np.ndarray
    pred: np.ndarray
    base_prob: np.ndarray
    base_pred: np.ndarray
    targets: np.ndarray
    labels: Optional[np.ndarray] = None
    gate: Optional[np.ndarray] = None
    renormalize: bool = False
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.prob.shape[0])

    @property
    def mode_names(self) -> Dict[int, str]:
        """``{mode: name}`` of the measured modes (module docstring)."""
        return {m: MODE_NAMES[m] for m in self.modes}

    def _reference(self) -> np.ndarray:
        return self.labels if self.labels is not None else self.targets

    def prob_drop(self) -> np.ndarray:
        """``(modes, blocks, heads)``: mean over images of ``base_prob - prob``."""
        return (self.base_prob[:, None, None, None] - self.prob).mean(0)

    def accuracy_drop(self) -> np.ndarray:
        """``(modes, blocks, heads)``: unpruned accuracy minus pruned accuracy."""
        ref = self._reference()
        base = (self.base_pred == ref).mean()
        return base - (self.pred == ref[:, None, None, None]).mean(0)

    def gate_score(self) -> Optional[np.ndarray]:
        """``(blocks, heads)``: mean absolute gate gradient (``None`` when not computed)."""
        return None if self.gate is None else self.gate.mean(0)

    def mode_groups(self, measure: str = 'prob_drop', rel_tol: float = 0.01) -> List[List[int]]:
        """The measured modes grouped by equal results: modes whose ``(blocks, heads)`` values of
        ``measure`` (``'prob_drop'`` or ``'accuracy_drop'``) differ nowhere by more than ``rel_tol``
        of the largest absolute value (of any mode) fall in one group, in mode order.  A model
        without prefix tokens, for example, gives modes 1, 3, 5 and 6 one group (they zero
        nothing)."""
        data = self.prob_drop() if measure == 'prob_drop' else self.accuracy_drop()
        tol = rel_tol * max(float(np.abs(data).max()), 1e-12)
        groups: List[List[int]] = []
        for i, m in enumerate(self.modes):
            for g in groups:
                if float(np.abs(data[i] - data[self.modes.index(g[0])]).max()) <= tol:
                    g.append(m)
                    break
            else:
                groups.append([m])
        return groups

    def __repr__(self) -> str:
        (b, h, d), = self.ranking(2 if 2 in self.modes else self.modes[0], 1)
        return (f'HeadImportance({self.num_images} image(s), modes {self.modes}, {len(self.blocks)} blocks x '
                f'{len(self.heads)} heads, against {"labels" if self.labels is not None else "the targets"}; most '
                f'important head: block {b}, head {h} (probability drop {d:+.4f}); gate scores: '
                f'{"yes" if self.gate is not None else "no"})')

    def mode_index(self, mode: int) -> int:
        if mode not in self.modes:
            raise KeyError(f'mode {mode} was not measured (measured: {self.modes})')
        return self.modes.index(mode)

    def ranking(self, mode: int = 2, k: int = 10) -> List[Tuple[int, int, float]]:
        """The ``k`` heads whose pruning in ``mode`` drops the target probability most, as
        ``(block, head, mean drop)``."""
        drop = self.prob_drop()[self.mode_index(mode)]
        order = np.argsort(-drop, axis=None, kind='stable')[:k]
        return [(self.blocks[i // drop.shape[1]], self.heads[i % drop.shape[1]], float(drop.flat[i]))
                for i in order]

    def to_dict(self) -> Dict[str, object]:
        """Dataset-level scores as plain Python (for JSON)."""
        g = self.gate_score()
        return {
            'modes': {m: MODE_NAMES[m] for m in self.modes}, 'blocks': self.blocks, 'heads': self.heads,
            'num_images': self.num_images, 'renormalize': self.renormalize,
            'base_accuracy': float((self.base_pred == self._reference()).mean()),
            'accuracy_against': 'labels' if self.labels is not None else 'targets',
            'prob_drop': np.round(self.prob_drop(), 6).tolist(),
            'accuracy_drop': np.round(self.accuracy_drop(), 6).tolist(),
            'gate_score': None if g is None else np.round(g, 8).tolist(),
        }


def head_importance(
        model: nn.Module,
        images: ImagesLike,
        modes: Sequence[int] = MODES,
        blocks: Optional[Iterable[int]] = None,
        *,
        target: Union[str, int] = 'predicted',
        renormalize: bool = False,
        gate: bool = True,
        num_images: Optional[int] = None,
        batch_size: int = 4,
        prune_batch: int = 64,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
) -> HeadImportance:
    """Prune every head of the chosen blocks in every mode, over a set of images.

    Args:
        model: a timm ViT-family classifier (run in eval mode, left as it was found).
        images: any form :func:`vitfree.analysis.inputs.iter_images` takes.
        modes: pruning modes (module docstring); default all six.
        blocks: blocks whose heads are pruned (``None`` = all).
        target: class whose probability is tracked: ``'predicted'`` (the unpruned prediction),
            ``'label'`` (needs labelled images) or a class index.
        renormalize: renormalise the masked attention rows (default: no).
        gate: also compute the gradient gate scores (one forward and backward per batch).
        num_images: use at most this many images.
        batch_size: images per batch; each batch expands into ``images x modes x heads`` rows.
        prune_batch: rows per masked forward.
        device: where to run (default: where the model is).
        progress: show a progress bar over masked forwards.

    Returns a :class:`HeadImportance`.
    """
    modes = _check_modes(modes)
    mods = attention_modules(model)
    chosen = normalize_blocks(blocks, len(mods))
    heads = list(range(mods[0].num_heads))
    rows_per_image = len(modes) * len(chosen) * len(heads)
    acc: Dict[str, List[torch.Tensor]] = {k: [] for k in ('prob', 'pred', 'base_prob', 'base_pred', 'targets',
                                                          'labels', 'gate')}
    have_labels = True
    loop = ImageLoop(model, images, 'head pruning', batch_size=batch_size, num_images=num_images, device=device,
                     progress=progress, grad=True, unit='fwd', per_image=rows_per_image, auto_update=False)
    with loop:
        for x, y in loop:
            with torch.no_grad():
                logits = model(x).float()
            t = resolve_targets(logits, y, target)
            acc['base_prob'].append(logits.softmax(-1).gather(1, t[:, None]).squeeze(1).cpu())
            acc['base_pred'].append(logits.argmax(-1).cpu())
            acc['targets'].append(t.cpu())
            have_labels = have_labels and y is not None
            if y is not None:
                acc['labels'].append(y.cpu())
            prob, pred = prune_heads(model, x, t, modes, chosen, renormalize=renormalize, prune_batch=prune_batch,
                                     bar=loop.bar)
            acc['prob'].append(prob.cpu())
            acc['pred'].append(pred.cpu())
            if gate:
                acc['gate'].append(gate_gradients(model, x, t, chosen).cpu())
    cat = {k: torch.cat(v).numpy() for k, v in acc.items() if v}
    return HeadImportance(
        modes=modes, blocks=chosen, heads=heads, prob=cat['prob'], pred=cat['pred'], base_prob=cat['base_prob'],
        base_pred=cat['base_pred'], targets=cat['targets'], labels=cat.get('labels') if have_labels else None,
        gate=cat.get('gate'), renormalize=renormalize,
        meta={'model': model_name(model), 'target': str(target), 'data': describe_images(images)},
    )
