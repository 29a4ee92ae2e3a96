"""Record post-softmax attention during an ordinary forward pass.

    with vitfree.record(model, blocks=[0, 5], heads=[0, 1]) as rec:
        logits = model(x)
    rec.attention[5]          # (B, 2, T, T) post-softmax probabilities, T = prefix + patches

Only the recorded blocks leave their fused kernel (they run an explicit softmax for the
duration of the context); every other block, timm's ``fused_attn`` flags and the vitfree
backend choice are untouched, and the model is restored exactly on exit, also when the
forward raises.  See :class:`Recorder`.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .hooks import attention_modules, attention_override, normalize_blocks, num_prefix_tokens, patch_grid

__all__ = ['Recorder', 'record', 'RecordingTooLarge', 'available_memory']

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
    forward replaces the previous one); ``grid`` and ``num_prefix_tokens`` say how to split
    ``T``.  Use as a context manager or call :meth:`attach` / :meth:`detach` yourself.
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
        self.attention: Dict[int, torch.Tensor] = {}
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
            raise KeyError(f'block {block} was not recorded (recorded: {sorted(self.attention) or "none yet"})')
        p = self.num_prefix_tokens
        return self.attention[block][..., p:, p:]

    def interaction_maps(self, per_head: bool = False) -> Dict[int, torch.Tensor]:
        """Per recorded block, the attention interaction map of the last forward: the patch block
        averaged over images (and heads unless ``per_head``), each row rescaled to sum to 1.
        Shape ``(N, N)`` (or ``(heads, N, N)``), queries are rows."""
        from .interaction import row_normalize
        out = {}
        for b in sorted(self.attention):
            a = self.patch_attention(b).detach().float().mean(0)
            out[b] = row_normalize(a if per_head else a.mean(0)).cpu()
        return out

    def save(self, out_dir: Union[str, os.PathLike], image: Optional[torch.Tensor] = None,
             patches: Optional[Sequence[Union[int, Tuple[int, int]]]] = None) -> List[Path]:
        """Write PNGs of the interaction maps of the last forward into ``out_dir``: the whole
        ``N x N`` matrix per block, and, when ``image`` (a ``(3, H, W)`` tensor as the model saw
        it, or a PIL image) is given, the maps of a few ``patches`` drawn over the image."""
        from . import render
        if not self.attention:
            raise RuntimeError('nothing recorded yet: run a forward inside the recorder first')
        out_dir = Path(out_dir)
        maps = self.interaction_maps()
        grid = self.grid or patch_grid(self.model)
        paths = [render.plot_interaction_matrices(maps, out_dir / 'interaction_matrices.png')]
        if image is not None:
            paths.append(render.plot_interaction(image, maps, grid, out_dir / 'interaction_maps.png',
                                                 patches=patches, model=self.model))
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
