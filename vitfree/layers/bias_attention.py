"""Windowed attention for the families that add a position bias to the logits (METHODS §1.7).

* SAM's image encoder (timm's ``vision_transformer_sam``): the decomposed relative position bias,
  ``q_i . Rh[y_i - y_j] + q_i . Rw[x_i - x_j]``, passed to the kernel as per-query key-row and key-column
  terms (:class:`~vitfree.ops.bias.PositionBias` ``rows`` / ``cols``).  The block's own partition is
  switched off; the windows (partition windows reproduce SAM's pattern, METHODS §1.6) do its work.
  A block timm ran on partitions keeps its table, sized for one partition: offsets past it take its
  edge.  A block timm ran globally reads its table as timm does (:func:`timm.models.vision_transformer_sam.get_rel_pos`,
  resized to the grid of the input when the grid changes).
* BEiT: the per-head relative position table and its three class-token entries (``table`` and
  ``prefix``), plus a shared bias given by the model (``full``).

q, k and v are computed exactly as timm does; the rest of each layer is timm's.
"""
from typing import Optional, Tuple

import torch
from timm.models.beit import Attention as BeitAttention
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import get_rel_pos

from ..ops.bias import PositionBias, position_bias
from .eva_attention import biased_qkv, unpack_qkv
from .window_attention import WindowedCore

__all__ = ['WindowSamAttention', 'WindowBeitAttention', 'sam_rel_pos_bias', 'beit_table_bias']


def _offset_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """``(size, size, C)``: the table entry of query index ``a`` and key index ``b``, at offset ``a - b``
    from the centre of the table, clamped to its ends."""
    r = (rel_pos.shape[0] - 1) // 2
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[(idx.view(-1, 1) - idx.view(1, -1)).clamp(-r, r) + r]


def sam_rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: Tuple[int, int],
                     as_timm: bool) -> PositionBias:
    """SAM's decomposed relative position bias of ``(B, heads, N, C)`` queries on ``grid`` as key-row and
    key-column terms: with ``as_timm`` the tables as timm's global blocks read them (resized to the grid),
    else read at each offset, clamped to the table."""
    h, w = grid
    if as_timm:
        rh, rw = get_rel_pos(h, h, rel_pos_h), get_rel_pos(w, w, rel_pos_w)
    else:
        rh, rw = _offset_table(rel_pos_h, h), _offset_table(rel_pos_w, w)
    b, heads, n, c = q.shape
    r_q = q.reshape(b * heads, h, w, c)
    rows = torch.einsum('bhwc,hkc->bhwk', r_q, rh).reshape(b, heads, n, h)
    cols = torch.einsum('bhwc,wkc->bhwk', r_q, rw).reshape(b, heads, n, w)
    return position_bias(rows=rows, cols=cols)


class WindowSamAttention(WindowedCore, SamAttention):
    """The attention of SAM's encoder blocks with per-patch windows; takes and returns ``(B, H, W, C)``."""
    __jit_unused_properties__ = ['windows']
    timm_class = SamAttention
    rel_pos_as_timm: bool = True  # set per layer when the model is given windows

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``attn_mask`` (timm's SAM block passes none; vitfree's analysis hides keys with it) applies on top
        of the windows."""
        B, H, W, _ = x.shape
        N = H * W
        x = x.reshape(B, N, -1)
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias: Optional[PositionBias] = None
        if self.use_rel_pos:
            bias = sam_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W), self.rel_pos_as_timm)
        x = self.attend(q, k, v, attn_mask, bias=bias)
        x = self.proj_drop(self.proj(x))
        return x.view(B, H, W, -1)


def beit_table_bias(table: torch.Tensor, window_size: Tuple[int, int]) -> PositionBias:
    """BEiT's ``((2Wh-1)(2Ww-1) + 3, heads)`` relative position table as a per-head offset table and its
    class-token terms (query class token to patches, patches to the class token, class token to itself)."""
    heads = table.shape[1]
    offsets = table[:-3].t().reshape(heads, 2 * window_size[0] - 1, 2 * window_size[1] - 1)
    return position_bias(table=offsets, prefix=table[-3:].t())


class WindowBeitAttention(WindowedCore, BeitAttention):
    """BEiT's attention with per-patch windows; its relative position bias is added inside the windows."""
    __jit_unused_properties__ = ['windows']
    timm_class = BeitAttention

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        if self.q_bias is None:
            q, k, v = unpack_qkv(self.qkv(x), self.num_heads)
        else:
            q, k, v = unpack_qkv(biased_qkv(x, self.qkv.weight, self.q_bias, self.k_bias, self.v_bias,
                                            self.qkv_bias_separate), self.num_heads)
        bias: Optional[PositionBias] = None
        table = self.relative_position_bias_table
        if table is not None:
            bias = beit_table_bias(table, self.window_size)
        if shared_rel_pos_bias is not None:  # the model's shared bias, dense (heads, T, T) as timm gives it
            own, full = bias, shared_rel_pos_bias.view(-1, self.num_heads, N, N)
            bias = position_bias(full=full) if own is None else position_bias(table=own.table, prefix=own.prefix,
                                                                              full=full)
        x = self.attend(q, k, v, attn_mask, bias=bias)
        return self.proj_drop(self.proj(x))
