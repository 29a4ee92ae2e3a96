"""WinfT for timm's ``Eva`` family: EVA-02, DINOv3, PE (core and spatial), the RoPE ViTs (``vit_*_rope_*``)
and the SBB RoPE models.

Every block's attention (timm's ``EvaAttention`` or ``AttentionRope``) becomes the windowed layer of
:mod:`vitfree.layers.eva_attention`, which applies the model's own rotary embedding to q and k before the
windows are imposed.  Class token or none, register tokens (``num_reg_tokens``), pooling heads, absolute
position embeddings, ``dynamic_img_size`` and ``set_input_size`` (the rope follows the grid, as in timm)
all stay timm's; the state dict is timm's, so its checkpoints load strictly.

Registered (after ``import vitfree``): ``winft_eva02_tiny_patch14_224`` (tag ``mim_in22k``: timm's EVA-02
Tiny weights) and ``winft_vit_small_patch16_dinov3`` (tag ``lvd1689m``: timm's DINOv3 ViT-S/16 weights),
with the unmeasured prior specs of ``configs/``.  Any other model of the family: ``create_winft(name)``.
"""
from functools import partial
from typing import Any, Dict

import torch.nn as nn
from timm.layers import AttentionRope, LayerNorm
from timm.models import generate_default_cfgs, register_model
from timm.models.eva import Eva, checkpoint_filter_fn

from ..layers.eva_attention import WindowEvaAttention, WindowRopeAttention
from .build import Family, WinfTMixin, build_winft, register_family, timm_weights_cfg

__all__ = ['WinfTEva']


class WinfTEva(WinfTMixin, Eva):
    """timm's ``Eva`` with per-patch attention windows.

    Args:
        windows, attn_backend, window_resize: as in :class:`vitfree.WinfT`.
        **kwargs: everything :class:`timm.models.eva.Eva` takes.
    """
    __jit_unused_properties__ = list(getattr(Eva, '__jit_unused_properties__', [])) + ['window_spec', '_model_args']

    def _windowed_layer(self, attn: nn.Module) -> nn.Module:
        layer = WindowRopeAttention if isinstance(attn, AttentionRope) else WindowEvaAttention
        return layer.from_attention(attn, None, self.num_prefix_tokens, self.attn_backend)


register_family(Family('eva', Eva, WinfTEva, filter_fn=checkpoint_filter_fn))


default_cfgs = generate_default_cfgs({
    'winft_eva02_tiny_patch14_224.mim_in22k': timm_weights_cfg('eva02_tiny_patch14_224.mim_in22k'),
    'winft_vit_small_patch16_dinov3.lvd1689m': timm_weights_cfg('vit_small_patch16_dinov3.lvd1689m'),
})


def _create(variant: str, pretrained: bool, model_args: Dict[str, Any], kwargs: Dict[str, Any]) -> WinfTEva:
    return build_winft(WinfTEva, variant, pretrained, **dict(model_args, **kwargs))


@register_model
def winft_eva02_tiny_patch14_224(pretrained: bool = False, **kwargs) -> WinfTEva:
    """EVA-02 Tiny (timm's ``eva02_tiny_patch14_224``) with windows."""
    model_args = dict(img_size=224, patch_size=14, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4 * 2 / 3,
                      swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16), windows='winft_prior_d12_g16')
    return _create('winft_eva02_tiny_patch14_224', pretrained, model_args, kwargs)


@register_model
def winft_vit_small_patch16_dinov3(pretrained: bool = False, **kwargs) -> WinfTEva:
    """DINOv3 ViT-S/16 (timm's ``vit_small_patch16_dinov3``: 4 register tokens, rotary embedding, dynamic
    image size) with windows."""
    model_args = dict(patch_size=16, dynamic_img_size=True, embed_dim=384, depth=12, num_heads=6, qkv_bias=False,
                      init_values=1.0e-05, rope_type='dinov3', rope_temperature=100, rope_rotate_half=True,
                      use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=4, use_fc_norm=False,
                      norm_layer=partial(LayerNorm, eps=1e-5), windows='winft_prior_d12_g16')
    return _create('winft_vit_small_patch16_dinov3', pretrained, model_args, kwargs)
