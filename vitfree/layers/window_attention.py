"""``WindowAttention``: timm's ``Attention`` with per-patch windows, and the one attention forward.

Same constructor, same parameters (names and shapes) as :class:`timm.layers.Attention`, so
state dicts move between the two untouched; the windows are never parameters or persistent
buffers.  A block without windows (``global``) computes exactly what timm's ``Attention`` does.

There is one forward.  Its fused path runs a kernel chosen by the dispatcher
(:mod:`vitfree.ops.dispatch`); its explicit-softmax path (``fused_attn = False``, as in timm, or
``vitfree.use_backend('eager')``) passes the post-softmax probabilities through ``attn_drop``,
an identity outside training.  That module is the hook point: timm's ``AttentionExtract``
(``method='hook'``) and vitfree's recorder attach to it, so what they read is what the
forward computes.

Traced and scripted forms (TorchScript, FX, ``torch.jit.trace``, ``torch.export``, ONNX) run a
windowed block on one exact path built from plain tensor operations: the window mask is
built from the ``window_extents`` buffer at the grid the model was made for.
``torch.compile`` keeps the dispatcher: the backend is chosen, and its tile plans or masks
built, once while the graph is traced (see :func:`vitfree.ops.dispatch.layer_backend`).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from ..ops.dispatch import layer_backend, qkv_entry, run_backend
from ..windows import LayerWindows, WindowSpecError, check_resize_mode, extents_mask, to_grid

__all__ = ['WindowAttention', 'graph_window_bias', 'is_fx_tracing']


@torch.fx.wrap
def graph_window_bias(
        extents: torch.Tensor,
        num_prefix_tokens: int,
        like: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
) -> torch.Tensor:
    """The window mask of ``extents`` as an additive bias in ``like``'s dtype (0 inside, -inf
    outside), with the caller's ``attn_mask`` / ``is_causal`` on top.  Plain tensor operations,
    one FX node (``torch.fx.wrap``), scriptable."""
    allowed = extents_mask(extents, num_prefix_tokens)
    bias = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
        allowed.logical_not(), float('-inf'))
    return maybe_add_mask(bias, resolve_self_attn_mask(bias.shape[-1], bias, attn_mask, is_causal))


_fx = torch.fx._symbolic_trace
_is_fx_symbolic_tracing = getattr(_fx, 'is_fx_symbolic_tracing', None) or _fx.is_fx_tracing


@torch.jit.unused
def is_fx_tracing() -> bool:
    """True while ``torch.fx`` traces symbolically (timm's and torchvision's feature extraction)."""
    return bool(_is_fx_symbolic_tracing())


@torch.jit.unused
def _graph_mode() -> bool:
    """True while the forward is being traced into a graph that must be pure tensor operations."""
    return bool(torch.jit.is_tracing() or is_fx_tracing() or torch.compiler.is_exporting())


class WindowAttention(Attention):
    __jit_unused_properties__ = ['windows']
    """Multi-head self-attention in which each patch query sees only its window.

    Args (beyond timm's ``Attention``):
        windows: this block's :class:`~vitfree.windows.LayerWindows` at the model's native
            grid, or ``None`` for a global block.
        num_prefix_tokens: leading class/register tokens (always global).
        backend: attention backend name (``'auto'``, ``'dense'``, ``'tiled'``, ``'eager'``, ...);
            see :mod:`vitfree.ops.dispatch` for how it combines with ``vitfree.use_backend``.
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
        self.resize_mode = 'scale'
        self.last_backend: Optional[str] = None
        self.windowed = False
        self.grid: Tuple[int, int] = (0, 0)
        self._windows: Optional[LayerWindows] = None
        # the windows as a tensor for traced graphs; not in the state dict (windows are not weights)
        self.register_buffer('window_extents', torch.zeros(0, 0, 4, dtype=torch.int32), persistent=False)
        self.set_windows(windows)

    # ---- windows ------------------------------------------------------------------------
    @property
    def windows(self) -> Optional[LayerWindows]:
        """Windows at the native grid (``None`` = global block)."""
        return self._windows

    def set_windows(self, windows: Optional[LayerWindows], num_prefix_tokens: Optional[int] = None,
                    resize_mode: Optional[str] = None) -> None:
        if windows is not None and not isinstance(windows, LayerWindows):
            raise TypeError(f'windows must be LayerWindows or None, got {type(windows).__name__}')
        if windows is not None and windows.per_head and windows.num_heads != self.num_heads:
            raise WindowSpecError(f'per-head windows for {windows.num_heads} heads given to an attention layer '
                                  f'with {self.num_heads} heads')
        self._windows = windows
        self.windowed = windows is not None
        if num_prefix_tokens is not None:
            self.num_prefix_tokens = num_prefix_tokens
        if resize_mode is not None:
            self.resize_mode = check_resize_mode(resize_mode)
        if windows is not None:
            self.grid = windows.grid
            ext = windows.extents_tensor(self.window_extents.device)
        else:
            ext = torch.zeros(0, 0, 4, dtype=torch.int32, device=self.window_extents.device)
        self.window_extents = ext.clone()

    def set_grid(self, grid) -> None:
        """Tell the layer the patch grid of the coming input (the model does this)."""
        self.grid = to_grid(grid)

    def windows_for(self, num_patches: int) -> Optional[LayerWindows]:
        """The windows resized (``resize_mode``, METHODS §1.4) to the grid of the current input."""
        if self._windows is None:
            return None
        return self._windows.resize(self._grid_for(num_patches), self.resize_mode)

    def _grid_for(self, num_patches: int) -> Tuple[int, int]:
        grid = self.grid
        if grid[0] * grid[1] != num_patches:
            if self._windows is not None and self._windows.num_patches == num_patches:
                return self._windows.grid
            raise WindowSpecError(
                f'{num_patches} patch tokens do not match the grid {grid[0]}x{grid[1]} this layer was told '
                f'about; call set_grid((H, W)) before running it on another image size')
        return grid

    # ---- forward ------------------------------------------------------------------------
    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        dropout_p = self.attn_drop.p if self.training else 0.0

        if self.windowed and not (torch.jit.is_scripting() or _graph_mode()):
            x = self._dispatched(qkv, attn_mask, is_causal, dropout_p)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if not self.windowed:
                if self.fused_attn:
                    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                       is_causal=is_causal)
                else:
                    x = self.softmax_attention(q, k, v, None, attn_mask, is_causal)
            else:
                bias = graph_window_bias(self.window_extents, self.num_prefix_tokens, q, attn_mask, is_causal)
                if self.fused_attn:
                    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.scale)
                else:
                    x = self.softmax_attention(q, k, v, bias)
            x = x.transpose(1, 2).reshape(B, N, self.attn_dim)

        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    def softmax_attention(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            window_bias: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """The explicit-softmax path; the probabilities pass through ``attn_drop``, the hook point.

        Logits and softmax are computed in fp32 (fp64 for fp64 inputs), whatever the input dtype,
        so the probabilities that hooks read are never rounded to half precision."""
        wide = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = q.to(wide) * self.scale
        attn = q @ k.to(wide).transpose(-2, -1)
        attn = maybe_add_mask(attn, window_bias)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[-2], attn, attn_mask, is_causal))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        return (attn @ v.to(wide)).to(v.dtype)

    @torch.jit.unused
    def _dispatched(self, qkv: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                    dropout_p: float) -> torch.Tensor:
        """Windowed attention outside traced graphs: the dispatcher's kernel, or the softmax path.
        ``qkv`` is the ``(B, N, 3, heads, head_dim)`` projection; returns ``(B, N, attn_dim)``."""
        B, N = qkv.shape[:2]
        p = self.num_prefix_tokens
        grid = self._grid_for(N - p)
        force = 'eager' if not self.fused_attn else 'dense' if attn_mask is not None or is_causal else ''
        name = layer_backend(self._windows.key, grid[0], grid[1], self.resize_mode, p,
                             0 if torch.compiler.is_compiling() else B, self.num_heads, self.head_dim,
                             qkv.dtype, qkv.device.type, -1 if qkv.device.index is None else qkv.device.index,
                             torch.is_grad_enabled() and qkv.requires_grad, self.backend or '', force)
        windows = self._windows.resize(grid, self.resize_mode)
        self.last_backend = name
        fused = qkv_entry(name)
        if (fused is not None and dropout_p == 0.0 and isinstance(self.q_norm, nn.Identity)
                and isinstance(self.k_norm, nn.Identity)):
            return fused(qkv, windows, p, self.scale).reshape(B, N, self.attn_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if name == 'eager':
            x = self.softmax_attention(q, k, v, windows.bias(p, q.device, q.dtype), attn_mask, is_causal)
        elif name == 'dense' and (attn_mask is not None or is_causal):  # the caller's mask on top of the windows
            bias = maybe_add_mask(windows.bias(p, q.device, q.dtype),
                                  resolve_self_attn_mask(q.shape[-2], q, attn_mask, is_causal))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=self.scale)
        else:
            x = run_backend(name, q, k, v, windows, p, self.scale, dropout_p)
        return x.transpose(1, 2).reshape(B, N, self.attn_dim)

    def extra_repr(self) -> str:
        w = 'global' if self._windows is None else repr(self._windows)
        return f'num_heads={self.num_heads}, windows={w}, backend={self.backend or "auto"}'
