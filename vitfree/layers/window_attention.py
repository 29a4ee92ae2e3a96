"""``WindowAttention``: timm's ``Attention`` with per-patch windows, and the one windowed attention core.

Same parameters (names and shapes) as :class:`timm.layers.Attention`, so state dicts move between
the two untouched; the windows are never parameters or persistent buffers.  A block without
windows (``global``) computes exactly what timm's ``Attention`` does.  A timm ``Attention`` becomes
a ``WindowAttention`` in place with :meth:`WindowAttention.from_attention` (its modules and
parameters move over as they are), which is how models are given windows.

:class:`WindowedCore` is what every windowed layer shares, whatever its family (timm's
``Attention`` here; EVA's rotary attention and the position-bias attentions elsewhere): the
windows, the grid of the current input, and :meth:`WindowedCore.attend`, the one windowed
attention forward.  It asks the dispatcher (:mod:`vitfree.ops.dispatch`) for a plan with one
query and runs it.  On the explicit-softmax path (``fused_attn = False``, as in timm,
``vitfree.use_backend('eager')``, or a hook on ``attn_drop``) the post-softmax probabilities pass through ``attn_drop``, an
identity outside training: that module is the hook point, so timm's ``AttentionExtract``
(``method='hook'``) and vitfree's recorder read what the forward computes.

Graphs: ``torch.compile`` keeps the dispatcher (the plan is made while the graph is traced).
Symbolic FX tracing (timm's feature extraction, ``AttentionExtract(method='fx')``) calls the
dispatched kernel as one leaf function on the fused path, so the graph computes bit for bit
what the module does, and traces the explicit-softmax path op by op.  TorchScript,
``torch.jit.trace``, ``torch.export`` and ONNX run windowed blocks on plain tensor operations: the
window mask is built from the ``window_extents`` buffer at the grid the model was made for.
"""
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from ..ops.bias import PositionBias, dense_position_bias
from ..ops.dispatch import AUTO, make_query, plan
from ..ops.eager import apply_probs, softmax_probs
from ..windows import LayerWindows, WindowSpecError, check_resize_mode, extents_mask, to_grid

__all__ = ['WindowAttention', 'WindowedCore', 'graph_window_bias', 'is_fx_tracing', 'fx_window_attention']

torch.fx.wrap('resolve_self_attn_mask')  # timm's own wrap covers only calls from timm's module
torch.fx.wrap('dense_position_bias')  # reads the parts' shapes: one FX node


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
def _plain_graph() -> bool:
    """True while the forward is traced into a graph of plain tensor operations (jit.trace, export)."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_exporting())


def grid_for(native: Optional[LayerWindows], grid: Tuple[int, int], num_patches: int) -> Tuple[int, int]:
    """The patch grid of an input with ``num_patches`` patch tokens, given the grid the layer was told."""
    if grid[0] * grid[1] != num_patches:
        if native is not None and native.num_patches == num_patches:
            return native.grid
        raise WindowSpecError(
            f'{num_patches} patch tokens do not match the grid {grid[0]}x{grid[1]} this layer was told about; '
            f'call set_grid((H, W)) before running it on another image size')
    return grid


def run_windows(windows: LayerWindows, grid: Tuple[int, int], resize_mode: str, num_prefix_tokens: int,
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv: Optional[torch.Tensor], scale: float,
                dropout_p: float, attn_mask: Optional[torch.Tensor], backend: str, explicit_softmax: bool,
                probs_hook=None, bias: Optional[PositionBias] = None) -> Tuple[torch.Tensor, str]:
    """The windowed attention of a layer, eagerly or inside ``torch.compile``: ``(B, heads, T, d)`` q, k,
    v (and the packed ``qkv`` projection when the fused entry may be used, else None; and a position
    ``bias``) -> ``(B, T, heads * value_dim)`` and the backend that ran."""
    b, h, t, d = q.shape
    query = make_query(q, grid, num_prefix_tokens, h, d, v.shape[-1], dropout=dropout_p > 0,
                       caller_mask=attn_mask is not None, override=backend, explicit_softmax=explicit_softmax,
                       bias=bias)
    p = plan(windows, query, resize_mode)
    if qkv is not None and p.has_qkv_entry:
        return p.from_qkv(qkv, scale).reshape(b, t, h * d), p.name
    x = p(q, k, v, scale, dropout_p, attn_mask, probs_hook, bias)
    return x.transpose(1, 2).reshape(b, t, h * v.shape[-1]), p.name


@torch.fx.wrap
@torch.jit.ignore
def fx_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qkv: Optional[torch.Tensor],
                        extents: torch.Tensor, native_h: int, native_w: int, resize_mode: str, num_prefix_tokens: int,
                        scale: float, dropout_p: float, attn_mask: Optional[torch.Tensor], backend: str,
                        bias: Optional[PositionBias] = None) -> torch.Tensor:
    """:func:`run_windows` as one FX leaf: an FX graph of a windowed model runs the very kernel the
    module runs (the windows come back from the ``window_extents`` buffer, interned to the same object)."""
    windows = LayerWindows(extents.cpu().numpy().astype(np.int64), (native_h, native_w))
    grid = grid_for(windows, windows.grid, q.shape[-2] - num_prefix_tokens)
    return run_windows(windows, grid, resize_mode, num_prefix_tokens, q, k, v, qkv, scale, dropout_p, attn_mask,
                       backend, False, None, bias)[0]


class WindowedCore:
    """The windows of an attention layer and the one attention forward, windowed or global (a mixin for
    ``nn.Module`` attention classes that define ``num_heads``, ``scale``, ``attn_drop`` and ``fused_attn``).

    A windowed layer class is ``class WindowX(WindowedCore, X)`` for a timm attention class ``X``
    (``timm_class``): its forward computes q, k, v exactly as ``X`` does, then calls :meth:`attend`."""
    __jit_unused_properties__ = ['windows']
    timm_class: type = nn.Module

    @classmethod
    def from_attention(cls, attn: nn.Module, windows: Optional[LayerWindows] = None, num_prefix_tokens: int = 1,
                       backend: Optional[str] = None):
        """The windowed layer holding ``attn``'s own modules, parameters and buffers (nothing is copied:
        the state dict stays the same)."""
        if not isinstance(attn, cls.timm_class):
            raise TypeError(f'{cls.__name__} is made from a {cls.timm_class.__module__}.{cls.timm_class.__name__}, '
                            f'got {type(attn).__name__}')
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for key, val in vars(attn).items():
            if key not in ('_parameters', '_buffers', '_modules', '_non_persistent_buffers_set'):
                object.__setattr__(new, key, val)
        for name, m in attn._modules.items():
            new._modules[name] = m
        for name, p in attn._parameters.items():
            new._parameters[name] = p
        for name, b in attn._buffers.items():
            new._buffers[name] = b
        new._non_persistent_buffers_set = set(attn._non_persistent_buffers_set)
        new.init_windows(windows, num_prefix_tokens, backend)
        return new

    def init_windows(self, windows: Optional[LayerWindows], num_prefix_tokens: int, backend: Optional[str]) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.backend = backend or AUTO
        self.resize_mode = 'scale'
        self.last_backend: Optional[str] = None
        self.windowed = False
        self.grid: Tuple[int, int] = (0, 0)
        self._windows: Optional[LayerWindows] = None
        # the windows as a tensor for traced graphs; not in the state dict (windows are not weights)
        self.register_buffer('window_extents', torch.zeros(0, 0, 4, dtype=torch.int32), persistent=False)
        self.set_windows(windows)

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
        dev = self.window_extents.device
        if windows is not None:
            self.grid = windows.grid
            self.window_extents = windows.extents_tensor(dev)
        else:
            self.window_extents = torch.zeros(0, 0, 4, dtype=torch.int32, device=dev)

    def set_grid(self, grid) -> None:
        """Tell the layer the patch grid of the coming input (the model does this)."""
        self.grid = to_grid(grid)

    def windows_for(self, num_patches: int) -> Optional[LayerWindows]:
        """The windows resized (``resize_mode``, METHODS §1.4) to the grid of the current input."""
        if self._windows is None:
            return None
        return self._windows.resize(grid_for(self._windows, self.grid, num_patches), self.resize_mode)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
               is_causal: bool = False, qkv: Optional[torch.Tensor] = None,
               bias: Optional[PositionBias] = None) -> torch.Tensor:
        """Attention of this layer, windowed or (a global block) as timm computes it, on ``(B, heads, T, d)``
        q, k, v (after any q/k norm or rotary embedding); ``qkv``: the packed projection, when the q, k, v
        are plain slices of it (lets a fused kernel read it in place); ``bias``: a position term added to
        the logits of the pairs a query sees (:mod:`vitfree.ops.bias`).  Returns ``(B, T, heads * value_dim)``."""
        fused = self.fused_attn and not self.probs_hooked()
        b, h, t, _ = q.shape
        dropout_p = self.attn_drop.p if self.training else 0.0
        if not self.windowed:
            x = self._global(q, k, v, attn_mask, is_causal, bias, fused, dropout_p)
        elif torch.jit.is_scripting() or _plain_graph() or (is_fx_tracing() and not fused):
            mask = graph_window_bias(self.window_extents, self.num_prefix_tokens, q, attn_mask, is_causal)
            if bias is not None:
                grid = (self.window_extents.shape[-3], self.window_extents.shape[-2])
                mask = mask + dense_position_bias(bias, grid, self.num_prefix_tokens, mask)
            if fused:
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale)
            else:
                x = apply_probs(self.attn_drop(softmax_probs(q, k, self.scale, mask)), v)
        else:
            return self._dispatched(q, k, v, attn_mask, is_causal, qkv, fused, bias)
        return x.transpose(1, 2).reshape(b, t, h * v.shape[-1])

    def _global(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                is_causal: bool, bias: Optional[PositionBias], fused: bool, dropout_p: float) -> torch.Tensor:
        """A global block: timm's attention (SDPA, or the explicit softmax through ``attn_drop``), with a
        position bias added as the mask timm's position-bias families pass."""
        n = q.shape[-2]
        if bias is not None:
            pos = dense_position_bias(bias, self.grid, self.num_prefix_tokens, q)
            if attn_mask is not None or is_causal:
                pos = maybe_add_mask(pos, resolve_self_attn_mask(n, pos, attn_mask, is_causal))
            attn_mask, is_causal = pos, False
        if fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(n, attn, attn_mask, is_causal))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        return attn @ v

    def probs_hooked(self) -> bool:
        """A hook on ``attn_drop`` asks for the attention probabilities (timm's ``AttentionExtract``
        with ``method='hook'``, grad-cam): the layer then takes the explicit-softmax path, whose
        probabilities pass ``attn_drop``, even with fused attention on."""
        if torch.jit.is_scripting():
            return False
        return bool(self.attn_drop._forward_hooks or self.attn_drop._forward_pre_hooks)

    @torch.jit.unused
    def _dispatched(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    is_causal: bool, qkv: Optional[torch.Tensor], fused: bool,
                    bias: Optional[PositionBias] = None) -> torch.Tensor:
        """Outside plain graphs: the dispatcher's plan (inside an FX trace, as one leaf function)."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        mask = resolve_self_attn_mask(q.shape[-2], q, attn_mask, is_causal)
        if is_fx_tracing():
            native = self._windows.grid
            return fx_window_attention(q, k, v, qkv, self.window_extents, native[0], native[1], self.resize_mode,
                                       self.num_prefix_tokens, self.scale, dropout_p, mask, self.backend, bias)
        grid = grid_for(self._windows, self.grid, q.shape[-2] - self.num_prefix_tokens)
        x, self.last_backend = run_windows(self._windows, grid, self.resize_mode, self.num_prefix_tokens, q, k, v,
                                           qkv, self.scale, dropout_p, mask, self.backend, not fused,
                                           self.attn_drop, bias)
        return x


class WindowAttention(WindowedCore, Attention):
    """Multi-head self-attention in which each patch query sees only its window.

    Args (beyond timm's ``Attention``):
        windows: this block's :class:`~vitfree.windows.LayerWindows` at the model's native
            grid, or ``None`` for a global block.
        num_prefix_tokens: leading class/register tokens (always global).
        backend: attention backend name (``'auto'``, ``'dense'``, ``'tiled'``, ``'eager'``, ...);
            see :mod:`vitfree.ops.dispatch` for how it combines with ``vitfree.use_backend``.
    """
    __jit_unused_properties__ = ['windows']
    timm_class = Attention

    def __init__(self, dim: int, num_heads: int = 8, *, windows: Optional[LayerWindows] = None,
                 num_prefix_tokens: int = 1, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.init_windows(windows, num_prefix_tokens, backend)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        plain = isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)
        x = self.attend(q, k, v, attn_mask, is_causal, qkv if plain else None)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return x

    def extra_repr(self) -> str:
        w = 'global' if self._windows is None else repr(self._windows)
        return f'num_heads={self.num_heads}, windows={w}, backend={self.backend}'
