"""Windowed attention for timm's Eva family (EVA-02, DINOv3, PE core/spatial, the RoPE ViTs).

Two timm attention classes run those models: :class:`timm.models.eva.EvaAttention` (EVA, EVA-02,
DINOv3) and :class:`timm.layers.AttentionRope` (PE, ``attn_type='rope'``, grouped-query heads).
Their windowed layers compute q, k and v exactly as timm does (fused or separate projections, the
q/v bias with the zero k bias, ``qkv_bias_separate``, q/k norm, the rotary embedding on the patch
tokens after the prefix tokens, the k/v heads repeated for grouped-query attention), then run
:meth:`~vitfree.layers.window_attention.WindowedCore.attend` without the packed projection, so no
fused-qkv kernel entry can skip the rotation.  The inner ``norm``, the gate and the output
projection follow as in timm.  Parameters, buffers and state-dict keys are timm's own.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.eva import EvaAttention

from .window_attention import WindowedCore

__all__ = ['WindowEvaAttention', 'WindowRopeAttention', 'biased_qkv', 'unpack_qkv', 'split_heads']


def biased_qkv(x: torch.Tensor, weight: torch.Tensor, q_bias: torch.Tensor, k_bias: torch.Tensor,
               v_bias: torch.Tensor, separate: bool) -> torch.Tensor:
    """The packed projection of the EVA / BEiT attentions with their q, k (zeros) and v biases, added
    after the product (``qkv_bias_separate``) or inside it, as timm does."""
    bias = torch.cat((q_bias, k_bias, v_bias))
    if separate:
        return F.linear(x, weight) + bias
    return F.linear(x, weight=weight, bias=bias)


def unpack_qkv(qkv: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, N, 3 * heads * d)`` -> q, k, v, each ``(B, heads, N, d)`` (views of the projection)."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, heads * d)`` -> ``(B, heads, N, d)``."""
    B, N, _ = x.shape
    return x.reshape(B, N, heads, -1).transpose(1, 2)


def rotate_patches(x: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool,
                   like: torch.Tensor) -> torch.Tensor:
    """timm's rotary step: the embedding applied to the patch tokens, the prefix tokens left as they are."""
    npt = num_prefix_tokens
    return torch.cat([x[:, :, :npt, :], apply_rot_embed_cat(x[:, :, npt:, :], rope, half=half)], dim=2).type_as(like)


class _RotaryLayer:
    """The forward both classes share: their own q, k, v (:meth:`_qkv`), q/k norm, the rotation, their
    own k/v heads (:meth:`_kv_heads`), the windowed attention, the inner norm, the gate and the output
    projection."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = rotate_patches(q, rope, self.num_prefix_tokens, self.rotate_half, v)
            k = rotate_patches(k, rope, self.num_prefix_tokens, self.rotate_half, v)
        k, v = self._kv_heads(k, v)
        x = self.norm(self.attend(q, k, v, attn_mask, is_causal))
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)


class WindowEvaAttention(WindowedCore, _RotaryLayer, EvaAttention):
    """timm's ``EvaAttention`` with per-patch windows (made from one with :meth:`from_attention`)."""
    __jit_unused_properties__ = ['windows']
    timm_class = EvaAttention

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is not None:
            if self.q_bias is None:
                return unpack_qkv(self.qkv(x), self.num_heads)
            return unpack_qkv(biased_qkv(x, self.qkv.weight, self.q_bias, self.k_bias, self.v_bias,
                                         self.qkv_bias_separate), self.num_heads)
        h = self.num_heads
        return split_heads(self.q_proj(x), h), split_heads(self.k_proj(x), h), split_heads(self.v_proj(x), h)

    def _kv_heads(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return k, v


class WindowRopeAttention(WindowedCore, _RotaryLayer, AttentionRope):
    """timm's ``AttentionRope`` (grouped-query heads included) with per-patch windows."""
    __jit_unused_properties__ = ['windows']
    timm_class = AttentionRope

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is not None:
            return unpack_qkv(self.qkv(x), self.num_heads)
        kv = self.num_kv_heads
        return split_heads(self.q_proj(x), self.num_heads), split_heads(self.k_proj(x), kv), split_heads(
            self.v_proj(x), kv)

    def _kv_heads(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Grouped-query attention: each k/v head serves ``num_kv_groups`` query heads, as in timm."""
        if self.num_kv_groups > 1:
            k = k.repeat_interleave(self.num_kv_groups, dim=1)
            v = v.repeat_interleave(self.num_kv_groups, dim=1)
        return k, v
