"""WinfT for BEiT (timm's ``Beit``, ``beit_*`` and ``beitv2_*``).

Each block's attention becomes :class:`~vitfree.layers.bias_attention.WindowBeitAttention`: its relative
position table (and the shared one, where the model has it) is added inside the windows.  The class
token stays global.  ``set_input_size`` resizes the tables as timm does, and the windows follow.

Registered: ``winft_beit_base_patch16_224`` (tag ``in22k_ft_in22k_in1k``: timm's BEiT-B/16 weights),
with the unmeasured prior spec ``winft_prior_d12_g14``.
"""
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.beit import Beit, checkpoint_filter_fn

from ..layers.bias_attention import WindowBeitAttention
from .build import Family, WinfTMixin, build_winft, register_family, timm_weights_cfg

__all__ = ['WinfTBeit']


class WinfTBeit(WinfTMixin, Beit):
    """timm's ``Beit`` with per-patch attention windows.

    Args:
        windows, attn_backend, window_resize: as in :class:`vitfree.WinfT`.
        **kwargs: everything :class:`timm.models.beit.Beit` takes.
    """
    __jit_unused_properties__ = list(getattr(Beit, '__jit_unused_properties__', [])) + ['window_spec', '_model_args']

    def _windowed_layer(self, attn: nn.Module) -> WindowBeitAttention:
        return WindowBeitAttention.from_attention(attn, None, self.num_prefix_tokens, self.attn_backend)


register_family(Family('beit', Beit, WinfTBeit, filter_fn=checkpoint_filter_fn))

default_cfgs = generate_default_cfgs({
    'winft_beit_base_patch16_224.in22k_ft_in22k_in1k': timm_weights_cfg('beit_base_patch16_224.in22k_ft_in22k_in1k'),
})


@register_model
def winft_beit_base_patch16_224(pretrained: bool = False, **kwargs) -> WinfTBeit:
    """BEiT-B/16 at 224 px (timm's ``beit_base_patch16_224``) with windows."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, use_abs_pos_emb=False,
                      use_rel_pos_bias=True, init_values=0.1, windows='winft_prior_d12_g14')
    return build_winft(WinfTBeit, 'winft_beit_base_patch16_224', pretrained, **dict(model_args, **kwargs))
