"""Capturing attention: the recorder and every attention override, on the layer's hook point.

timm's ``Attention`` and vitfree's :class:`~vitfree.layers.WindowAttention` have one
explicit-softmax path (taken when ``fused_attn`` is False) in which the post-softmax
probabilities ``(B, heads, T, T)`` pass through ``attn_drop``, an identity outside training.
That module is the only place this package reads or changes attention: for the chosen blocks
:func:`attention_override` switches ``fused_attn`` off and hooks ``attn_drop``, so the
probabilities a callback sees are the very tensors the forward goes on with, computed by the
layer's own code (the same point timm's ``AttentionExtract`` hooks).  Every other block keeps
its fused kernel, and everything is restored on exit, also when the forward raises.

Callbacks::

    probs_fn(block, probs) -> probs | None     # (B, heads, T, T), post-softmax, before dropout

Returning ``None`` keeps the tensor; returning a tensor replaces it (head pruning, gates,
perturbations).  Overrides nest: the callbacks of an override opened inside another one run
after the outer ones, so a recorder opened inside a head-pruning context sees the pruned
probabilities.

Keys are hidden the standard way, through the ``attn_mask`` argument of timm's blocks
(``True`` = may attend): :func:`mask_patch_keys` passes one to every block for the duration.

    with vitfree.record(model, blocks=[0, 5], heads=[0, 1]) as rec:
        logits = model(x)
    rec.attention[5]          # (B, 2, T, T), T = prefix tokens + patches
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .inputs import ImageLoop, ImagesLike, patch_grid

__all__ = [
    'attention_modules', 'normalize_blocks', 'BlockDict', 'num_prefix_tokens', 'class_token_index', 'patch_grid',
    'row_normalize', 'attention_override', 'capture_block_io', 'mask_patch_keys', 'zero_empty_rows', 'combine_masks',
    'attention_pass', 'as_tokens', 'rerun_block',
    'Recorder', 'record', 'RecordingTooLarge', 'available_memory',
]

ProbsFn = Callable[[int, torch.Tensor], Optional[torch.Tensor]]


# ---- the model's structure ----------------------------------------------------------------------
def attention_modules(model: nn.Module) -> List[nn.Module]:
    """The attention module of every block of a timm ViT-family model (``model.blocks[i].attn``)."""
    blocks = getattr(model, 'blocks', None)
    ok = blocks is not None and all(
        hasattr(getattr(b, 'attn', None), a) for b in blocks for a in ('qkv', 'attn_drop', 'fused_attn'))
    if not ok:
        raise TypeError(f'{type(model).__name__} is not a timm ViT-family model: expected .blocks[i].attn with a '
                        f'fused qkv projection, a fused_attn flag and attn_drop (timm Attention or vitfree '
                        f'WindowAttention)')
    return [b.attn for b in blocks]


def normalize_blocks(blocks: Optional[Iterable[int]], depth: int) -> List[int]:
    """``None`` -> all blocks; negative indices count from the end; errors name the bad index."""
    if blocks is None:
        return list(range(depth))
    if isinstance(blocks, int):
        blocks = [blocks]
    out = []
    for b in blocks:
        if not isinstance(b, int) or isinstance(b, bool) or not -depth <= b < depth:
            raise ValueError(f'block index {b!r} out of range for a model with {depth} blocks '
                             f'(valid: 0..{depth - 1} or negative from the end)')
        out.append(b % depth)
    return sorted(set(out))


class BlockDict(dict):
    """A dict keyed by block index that also takes negative indices, counted from the end of the
    model (``d[-1]`` is the last block's entry when the last block is a key)."""

    def __init__(self, depth: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.depth = int(depth)

    def _key(self, block):
        if isinstance(block, int) and not isinstance(block, bool) and -self.depth <= block < 0:
            return block + self.depth
        return block

    def __getitem__(self, block):
        return super().__getitem__(self._key(block))

    def __contains__(self, block) -> bool:
        return super().__contains__(self._key(block))

    def get(self, block, default=None):
        return super().get(self._key(block), default)


def num_prefix_tokens(model: nn.Module) -> int:
    """Leading class/register tokens of a timm ViT-family model (0 when it has none)."""
    return int(getattr(model, 'num_prefix_tokens', 0))


def class_token_index(model: nn.Module) -> Optional[int]:
    """Token index of the class token (timm puts it first), ``None`` when the model has none."""
    return 0 if getattr(model, 'cls_token', None) is not None else None


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


# ---- the hook point ---------------------------------------------------------------------------------
def _probs_hook(block: int, fn: ProbsFn):
    """A forward pre-hook for ``attn_drop``: hands its input, the post-softmax probabilities, to
    ``fn`` and passes on what ``fn`` returns (the input when ``None``)."""
    def hook(module: nn.Module, args: Tuple[torch.Tensor, ...]):
        new = fn(block, args[0])
        return None if new is None else (new,) + tuple(args[1:])
    return hook


@contextlib.contextmanager
def attention_override(
        model: nn.Module,
        blocks: Optional[Iterable[int]] = None,
        probs_fn: Optional[ProbsFn] = None,
) -> Iterator[List[int]]:
    """Within the context, the chosen blocks run the layer's explicit-softmax path
    (``fused_attn = False``) and ``probs_fn(block, probs)`` sees, and may replace, their
    post-softmax probabilities at ``attn_drop``.

    Yields the list of block indices affected.  Blocks not chosen are untouched (fused).
    Nested overrides of the same block chain their callbacks, outer first.  On exit every
    ``fused_attn`` flag gets its previous value back and the hooks are removed.
    """
    mods = attention_modules(model)
    chosen = normalize_blocks(blocks, len(mods))
    saved: List[Tuple[nn.Module, bool]] = []
    handles = []
    try:
        for i in chosen:
            m = mods[i]
            saved.append((m, m.fused_attn))
            m.fused_attn = False
            if probs_fn is not None:
                handles.append(m.attn_drop.register_forward_pre_hook(_probs_hook(i, probs_fn)))
        yield chosen
    finally:
        for h in handles:
            h.remove()
        for m, flag in reversed(saved):
            m.fused_attn = flag


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """A block's input or output as ``(B, T, C)`` tokens (SAM's blocks work on ``(B, H, W, C)``)."""
    return t if t.dim() == 3 else t.flatten(1, -2)


@contextlib.contextmanager
def capture_block_io(model: nn.Module, blocks: Iterable[int]) -> Iterator[Dict[int, Dict[str, Any]]]:
    """Within the context, every forward stores, for the chosen ``model.blocks[i]``, ``{'input': x,
    'output': y}`` as ``(B, T, C)`` tokens (detached) and the call's other arguments (``'args'``,
    ``'kwargs'``: a rotary embedding, a shared position bias ...), so :func:`rerun_block` can run the
    block again as the model ran it; the hooks are removed on exit."""
    mods = list(model.blocks)
    chosen = normalize_blocks(list(blocks), len(mods))
    store: Dict[int, Dict[str, Any]] = {}
    handles = []

    def make(i: int):
        def hook(module, args, kwargs, output):
            store[i] = {'input': as_tokens(args[0].detach()), 'output': as_tokens(output.detach()),
                        'shape': tuple(args[0].shape[1:]), 'args': tuple(args[1:]), 'kwargs': dict(kwargs)}
        return hook

    try:
        for i in chosen:
            handles.append(mods[i].register_forward_hook(make(i), with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


def rerun_block(model: nn.Module, block: int, call: Mapping[str, Any], x: torch.Tensor,
                allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``model.blocks[block]`` on tokens ``x`` (``(B, T, C)``) with the other arguments of a call recorded
    by :func:`capture_block_io`, the keys limited to ``allowed`` (bool, broadcastable to ``(B, heads, T,
    T)``) through the block's attention; returns the output tokens."""
    blk = model.blocks[block]
    shaped = x.reshape(x.shape[0], *call['shape'])
    with _attention_mask(model, [block], allowed) if allowed is not None else contextlib.nullcontext():
        return as_tokens(blk(shaped, *call['args'], **call['kwargs']))


# ---- hiding keys ------------------------------------------------------------------------------------
def zero_empty_rows(block: int, probs: torch.Tensor) -> torch.Tensor:
    """A ``probs_fn``: a query whose every key is masked (a NaN row after the softmax) gets no
    attention at all, so its attention output is zero."""
    return torch.where(torch.isnan(probs), torch.zeros((), dtype=probs.dtype, device=probs.device), probs)


def combine_masks(given: Optional[torch.Tensor], allowed: torch.Tensor) -> torch.Tensor:
    """A caller's ``attn_mask`` (bool, ``True`` = may attend, or additive float) narrowed to
    the keys ``allowed`` (bool, broadcastable)."""
    if given is None:
        return allowed
    if given.dtype == torch.bool:
        return given & allowed
    return torch.where(allowed, given, torch.full((), float('-inf'), dtype=given.dtype, device=given.device))


@contextlib.contextmanager
def _attention_mask(model: nn.Module, chosen: List[int], allowed: torch.Tensor) -> Iterator[None]:
    """Within the context the attention modules of the chosen blocks get ``allowed`` (bool, ``(B, 1, 1,
    T)`` or broadcastable) as their ``attn_mask``, combined with one their block passes.  Every family's
    windowed layer (and timm's ``Attention`` / ``EvaAttention``) takes it, whatever its block's forward
    takes."""
    mods = attention_modules(model)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
        x = args[0]
        tokens = int(np.prod(x.shape[1:-1]))
        if allowed.shape[0] not in (1, x.shape[0]) or tokens != allowed.shape[-1]:
            raise ValueError(f'key mask is for {allowed.shape[0]} images x {allowed.shape[-1]} tokens, the forward '
                             f'has {x.shape[0]} x {tokens}')
        kwargs = dict(kwargs)
        kwargs['attn_mask'] = combine_masks(kwargs.get('attn_mask'), allowed.to(x.device))
        return args, kwargs

    handles = []
    try:
        for i in chosen:
            handles.append(mods[i].register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def mask_patch_keys(model: nn.Module, removed: torch.Tensor,
                    blocks: Optional[Iterable[int]] = None) -> Iterator[None]:
    """Within the context no query, in any chosen block (default: all), attends to the patches
    flagged in ``removed`` (``(B, N)`` bool, one row per image of the coming forward).

    The keys are hidden through the standard ``attn_mask`` argument of the attention layers (combined
    with one their block passes).  Prefix tokens stay visible.  The masked blocks run the
    layer's explicit-softmax path so that a query left with no key at all (possible in a
    windowed block of a model without prefix tokens) gets a zero attention output instead of
    NaN.  The masked patches' own tokens still flow through the residual stream.
    """
    chosen = normalize_blocks(blocks, len(attention_modules(model)))
    npt = num_prefix_tokens(model)
    if removed.dim() != 2 or removed.dtype != torch.bool:
        raise ValueError(f'removed must be a (B, N) bool tensor of patches to hide, got {removed.dtype} '
                         f'{tuple(removed.shape)}')
    allowed = torch.ones(removed.shape[0], npt + removed.shape[1], dtype=torch.bool, device=removed.device)
    allowed[:, npt:] = ~removed
    allowed = allowed[:, None, None, :]  # (B, 1, 1, T): the same keys for every head and query
    with attention_override(model, chosen, probs_fn=zero_empty_rows), _attention_mask(model, chosen, allowed):
        yield


# ---- running a model over images --------------------------------------------------------------------
def attention_pass(
        model: nn.Module,
        images: ImagesLike,
        on_probs: Callable[[int, torch.Tensor, torch.Tensor, Tuple[int, int]], None],
        blocks: Optional[Iterable[int]] = None,
        *,
        num_images: Optional[int] = None,
        batch_size: int = 16,
        device: Union[str, torch.device, None] = None,
        progress: bool = True,
        desc: str = 'attention',
) -> Dict[str, torch.Tensor]:
    """Run the model (eval mode, no grad) over ``images`` and call
    ``on_probs(block, probs, x, grid)`` with each chosen block's post-softmax attention
    ``(B, heads, T, T)``, in block order, batch after batch.

    ``images`` takes every form :func:`vitfree.analysis.inputs.iter_images` does.  Returns
    the concatenated ``logits`` (CPU, float) and ``labels`` (``None`` unless every batch had
    labels), so callers also get the predictions.
    """
    chosen = normalize_blocks(blocks, len(attention_modules(model)))
    state: Dict[str, object] = {}
    logits: List[torch.Tensor] = []
    labels: List[Optional[torch.Tensor]] = []

    def probs_fn(block: int, probs: torch.Tensor) -> None:
        on_probs(block, probs, state['x'], state['grid'])

    loop = ImageLoop(model, images, desc, batch_size=batch_size, num_images=num_images, device=device,
                     progress=progress)
    with loop, attention_override(model, chosen, probs_fn=probs_fn):
        for x, y in loop:
            state['x'], state['grid'] = x, loop.grid
            logits.append(model(x).detach().float().cpu())
            labels.append(None if y is None else y.cpu())
    y = None if any(v is None for v in labels) else torch.cat(labels)
    return {'logits': torch.cat(logits), 'labels': y}


# ---- the recorder -----------------------------------------------------------------------------------
MAX_FRACTION = 0.5  # default limit: this fraction of the memory currently available


class RecordingTooLarge(MemoryError):
    """A recording would need more memory than the recorder was allowed to use."""


def available_memory(device: Union[str, torch.device, None] = None) -> int:
    """Bytes currently available on ``device``: free CUDA memory, or the operating system's
    ``MemAvailable`` for the CPU (physical memory when that is unknown)."""
    dev = torch.device(device) if device is not None else torch.device('cpu')
    if dev.type == 'cuda' and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _mib(n: float) -> str:
    return f'{n / 2 ** 20:,.1f} MiB'


class Recorder:
    """Captures the attention probabilities of chosen blocks and heads.

    Args:
        model: a timm ViT-family model (WinfT, ``vit_*``, ``deit_*``; class and register
            tokens and ``dynamic_img_size`` are fine).
        blocks: block indices to record (negative counts from the end); ``None`` = all.
        heads: head indices to keep; ``None`` = all heads.
        grad: keep the recorded tensors in the autograd graph (they are the very tensors the
            forward continues with), so ``torch.autograd.grad(score, rec.attention[l])`` or
            ``rec.attention[l].grad`` after ``backward()`` gives ``d score / d A``.  Off by
            default: recordings are then detached.
        device: where to keep the recordings (e.g. ``'cpu'`` to spare GPU memory); ignored
            with ``grad=True``.  ``None`` = where the model runs.
        max_bytes: refuse (raise :class:`RecordingTooLarge` from the forward, before storing
            anything) when one forward's recording would exceed this many bytes.  ``None`` =
            half the memory available on the storage device when the forward starts.

    ``attention[block]`` holds the last forward's ``(B, heads, T, T)`` probabilities (each
    forward replaces the previous one); its keys are the block indices counted from 0, and a
    negative index counts from the end, as in ``blocks`` (``rec.attention[-1]`` is the last
    block's recording).  ``grid`` and ``num_prefix_tokens`` say how to split ``T``.  Use as a context manager or call :meth:`attach` / :meth:`detach` yourself.
    """

    def __init__(
            self,
            model: nn.Module,
            blocks: Optional[Iterable[int]] = None,
            heads: Optional[Sequence[int]] = None,
            *,
            grad: bool = False,
            device: Union[str, torch.device, None] = None,
            max_bytes: Optional[int] = None,
    ) -> None:
        mods = attention_modules(model)
        self.model = model
        self.blocks: List[int] = normalize_blocks(blocks, len(mods))
        num_heads = mods[0].num_heads
        if heads is not None:
            heads = [heads] if isinstance(heads, int) else list(heads)
            bad = [h for h in heads if not isinstance(h, int) or not -num_heads <= h < num_heads]
            if bad or not heads:
                raise ValueError(f'heads must be a non-empty list of head indices in 0..{num_heads - 1}, got {heads!r}')
            heads = sorted({h % num_heads for h in heads})
            if heads == list(range(num_heads)):
                heads = None
        self.heads: Optional[List[int]] = heads
        self.num_heads = num_heads
        self.grad = bool(grad)
        self.device = None if device is None else torch.device(device)
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f'max_bytes must be positive (or None for half the available memory), got {max_bytes}')
        self.max_bytes = max_bytes
        self.num_prefix_tokens = num_prefix_tokens(model)
        self.grid: Optional[Tuple[int, int]] = None
        self.attention: Dict[int, torch.Tensor] = BlockDict(len(mods))
        self.calls = 0
        self._stack: Optional[contextlib.ExitStack] = None

    # ---- attach / detach -------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._stack is not None

    def attach(self) -> 'Recorder':
        """Start recording (idempotent); returns ``self``."""
        if self._stack is not None:
            return self
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(attention_override(self.model, self.blocks, probs_fn=self._on_probs))
            pe = getattr(self.model, 'patch_embed', None)
            if pe is not None:
                handle = pe.register_forward_pre_hook(self._on_images)
                stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def detach(self) -> None:
        """Stop recording and restore the model; recordings stay available."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> 'Recorder':
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def clear(self) -> None:
        """Drop the recordings (frees their memory)."""
        self.attention.clear()

    # ---- memory ------------------------------------------------------------------------------
    def estimate_bytes(self, batch_size: int, num_tokens: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one forward's recording takes: ``batch x heads x T x T x itemsize`` per block."""
        heads = self.num_heads if self.heads is None else len(self.heads)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return int(batch_size) * heads * int(num_tokens) ** 2 * itemsize * len(self.blocks)

    def _check_memory(self, probs: torch.Tensor) -> None:
        B, _, T, _ = probs.shape
        need = self.estimate_bytes(B, T, probs.dtype)
        dev = probs.device if (self.grad or self.device is None) else self.device
        limit = self.max_bytes if self.max_bytes is not None else int(MAX_FRACTION * available_memory(dev))
        if need > limit:
            heads = self.num_heads if self.heads is None else len(self.heads)
            raise RecordingTooLarge(
                f'recording attention of {len(self.blocks)} block(s) would need {_mib(need)} '
                f'(batch {B} x {heads} heads x {T} x {T} tokens x {probs.element_size()} bytes x {len(self.blocks)} '
                f'blocks) but the limit is {_mib(limit)} on {dev} '
                f'({"max_bytes" if self.max_bytes is not None else f"{MAX_FRACTION:.0%} of available memory"}); '
                f'record fewer blocks or heads, use a smaller batch, or raise max_bytes')

    # ---- callbacks -----------------------------------------------------------------------------
    def _on_images(self, module: nn.Module, args) -> None:
        x = args[0] if args else None
        if torch.is_tensor(x) and x.dim() == 4:
            self.grid = patch_grid(self.model, x.shape[-2:])

    def _on_probs(self, block: int, probs: torch.Tensor) -> Optional[torch.Tensor]:
        if block == self.blocks[0]:  # a new forward starts: check the budget, drop the last one
            self.attention.clear()
            self._check_memory(probs)
            self.calls += 1
        if not self.grad:
            kept = probs.detach() if self.heads is None else probs.detach()[:, self.heads]
            if self.device is not None:
                kept = kept.to(self.device)
            self.attention[block] = kept
            return None
        if self.heads is None:
            if probs.requires_grad:
                probs.retain_grad()
            self.attention[block] = probs
            return None
        # the kept heads must lie on the path to the output for their gradient to exist
        kept = probs[:, self.heads]
        if kept.requires_grad:
            kept.retain_grad()
        out = probs.clone()
        out[:, self.heads] = kept
        self.attention[block] = kept
        return out

    # ---- derived views -------------------------------------------------------------------------
    def patch_attention(self, block: int) -> torch.Tensor:
        """The patch-to-patch part ``(B, heads, N, N)`` of a recorded block."""
        if block not in self.attention:
            raise KeyError(f'block {block} was not recorded (recorded: {sorted(self.attention) or "none yet"}; '
                           f'negative indices count from the end)')
        p = self.num_prefix_tokens
        return self.attention[block][..., p:, p:]

    def interaction_maps(self, per_head: bool = False) -> Dict[int, torch.Tensor]:
        """Per recorded block, the attention interaction map of the last forward: the patch block
        averaged over images (and heads unless ``per_head``), each row rescaled to sum to 1.
        Shape ``(N, N)`` (or ``(heads, N, N)``), queries are rows."""
        out = BlockDict(self.attention.depth)
        for b in sorted(self.attention):
            a = self.patch_attention(b).detach().float().mean(0)
            out[b] = row_normalize(a if per_head else a.mean(0)).cpu()
        return out

    def save(self, out_dir: Union[str, os.PathLike], image: Optional[torch.Tensor] = None,
             patches: Optional[Sequence[Union[int, Tuple[int, int]]]] = None) -> List[Path]:
        """Write PNGs of the interaction maps of the last forward into ``out_dir``: the whole
        ``N x N`` matrix per block, and, when ``image`` (a ``(3, H, W)`` tensor as the model saw
        it, or a PIL image) is given, the maps of a few ``patches`` drawn over the image."""
        from .plots import plot_interaction, plot_interaction_matrices
        if not self.attention:
            raise RuntimeError('nothing recorded yet: run a forward inside the recorder first')
        out_dir = Path(out_dir)
        maps = self.interaction_maps()
        grid = self.grid or patch_grid(self.model)
        paths = [plot_interaction_matrices(maps, out_dir / 'interaction_matrices.png')]
        if image is not None:
            paths.append(plot_interaction(image, maps, grid, out_dir / 'interaction_maps.png', patches=patches,
                                          model=self.model))
        return paths

    def __repr__(self) -> str:
        heads = 'all' if self.heads is None else self.heads
        return (f'Recorder(blocks={self.blocks}, heads={heads}, grad={self.grad}, attached={self.attached}, '
                f'recorded={sorted(self.attention)})')


def record(
        model: nn.Module,
        blocks: Optional[Iterable[int]] = None,
        heads: Optional[Sequence[int]] = None,
        **kwargs,
) -> Recorder:
    """A :class:`Recorder` for ``with`` use: ``with vitfree.record(model) as rec: model(x)``.

    Keyword arguments (``grad``, ``device``, ``max_bytes``) as in :class:`Recorder`.
    """
    return Recorder(model, blocks=blocks, heads=heads, **kwargs)
