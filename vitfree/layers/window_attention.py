"""``WindowAttention``: timm's ``Attention`` with per-patch windows.

Same constructor, same parameters (names and shapes) as :class:`timm.layers.Attention`, so
state dicts move between the two untouched; the windows are plain Python state, never
parameters or persistent buffers.  A block without windows (``global``) runs timm's own code
path, bit for bit.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention

from ..ops.dispatch import resolve_backend, run_backend
from ..windows import LayerWindows, WindowSpecError, to_grid

__all__ = ['WindowAttention']


class WindowAttention(Attention):
    """Multi-head self-attention in which each patch query sees only its window.

    Args (beyond timm's ``Attention``):
        windows: this block's :class:`~vitfree.windows.LayerWindows` at the model's native
            grid, or ``None`` for a global block.
        num_prefix_tokens: leading class/register tokens (always global).
        backend: attention backend name (``'auto'``, ``'dense'``, ``'eager'``, ...), see
            :mod:`vitfree.ops.dispatch` for how it combines with ``vitfree.use_backend``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *,
            windows: Optional[LayerWindows] = None,
            num_prefix_tokens: int = 1,
            backend: Optional[str] = None,
            **kwargs,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.num_prefix_tokens = num_prefix_tokens
        self.backend = backend
        self.last_backend: Optional[str] = None
        self._windows: Optional[LayerWindows] = None
        self._resized: Dict[Tuple[int, int], LayerWindows] = {}
        self.grid: Optional[Tuple[int, int]] = None
        self.set_windows(windows)

    # ---- windows ------------------------------------------------------------------------
    @property
    def windows(self) -> Optional[LayerWindows]:
        """Windows at the native grid (``None`` = global block)."""
        return self._windows

    def set_windows(self, windows: Optional[LayerWindows], num_prefix_tokens: Optional[int] = None) -> None:
        if windows is not None and not isinstance(windows, LayerWindows):
            raise TypeError(f'windows must be LayerWindows or None, got {type(windows).__name__}')
        if windows is not None and windows.per_head and windows.num_heads != self.num_heads:
            raise WindowSpecError(f'per-head windows for {windows.num_heads} heads given to an attention layer '
                                  f'with {self.num_heads} heads')
        self._windows = windows
        self._resized = {} if windows is None else {windows.grid: windows}
        if num_prefix_tokens is not None:
            self.num_prefix_tokens = num_prefix_tokens
        if windows is not None:
            self.grid = windows.grid

    def set_grid(self, grid) -> None:
        """Tell the layer the patch grid of the coming input (the model does this)."""
        self.grid = to_grid(grid)

    def windows_for(self, num_patches: int) -> Optional[LayerWindows]:
        """Windows resized (METHODS: extents scale with the grid) to the current grid."""
        if self._windows is None:
            return None
        grid = self.grid or self._windows.grid
        if grid[0] * grid[1] != num_patches:
            if self._windows.num_patches == num_patches:
                grid = self._windows.grid
            else:
                raise WindowSpecError(
                    f'{num_patches} patch tokens do not match the grid {grid[0]}x{grid[1]} this layer was told '
                    f'about; call set_grid((H, W)) before running it on another image size')
        lw = self._resized.get(grid)
        if lw is None:
            lw = self._windows.resize(grid)
            self._resized[grid] = lw
        return lw

    # ---- forward ------------------------------------------------------------------------
    def qkv_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``(B, heads, T, head_dim)``, after the q/k norms (timm's layout)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def finish(self, x: torch.Tensor, out: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Merge heads and apply timm's output path (norm, gate, proj, dropout)."""
        B, N, _ = x.shape
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        if self._windows is None:
            self.last_backend = 'global'
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if is_causal:
            raise ValueError('is_causal=True makes no sense with 2-D windows; pass an explicit attn_mask instead')
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv_heads(x)
        windows = self.windows_for(x.shape[1] - self.num_prefix_tokens)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if attn_mask is not None:
            # combine the caller's mask with the windows on the reference path
            win = windows.mask(self.num_prefix_tokens, x.device)
            if attn_mask.dtype == torch.bool:
                mask = attn_mask & win
            else:
                mask = attn_mask.masked_fill(~win, float('-inf'))
            self.last_backend = 'dense'
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale)
        else:
            self.last_backend = resolve_backend(q, windows, self.num_prefix_tokens, self.backend)
            out = run_backend(self.last_backend, q, k, v, windows, self.num_prefix_tokens, self.scale, dropout_p)
        return self.finish(x, out, gate)

    def extra_repr(self) -> str:
        w = 'global' if self._windows is None else repr(self._windows)
        return f'num_heads={self.num_heads}, windows={w}, backend={self.backend or "auto"}'

