"""WinfT for SAM's image encoder (timm's ``VisionTransformerSAM``, ``samvit_*``).

Each block's attention becomes :class:`~vitfree.layers.bias_attention.WindowSamAttention`, which carries
SAM's decomposed relative position bias inside the windows, and the block's own partition is switched
off: the windows do its work.  With SAM's own pattern (:func:`sam_pattern`: partition windows of the
model's ``window_size`` and its global blocks) a WinfT computes SAM's encoder, except that SAM also
attends to the zero padding of the cells the grid edge cuts (a grid that is not a multiple of the
window, as 64 = 4 x 14 + 8 at 1024 px), which a WinfT never does.  The point is other windows: per-patch
windows in every block and no global block keep the cost linear in the number of patches.

Registered: ``winft_samvit_base_patch16`` (tag ``sa1b``: timm's SAM ViT-B weights, 1024 px), with SAM's
own pattern as its prior spec (``configs/winft_prior_sam_d12_g64.yaml``;
``configs/winft_local_sam_d12_g64.yaml`` holds per-patch windows of the same area, no global block).
"""
from typing import List, Tuple

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer_sam import VisionTransformerSAM, checkpoint_filter_fn

from ..layers.bias_attention import WindowSamAttention
from ..windows import WindowSpec
from .build import Family, WinfTMixin, build_winft, register_family, timm_weights_cfg

__all__ = ['WinfTSam', 'sam_pattern']


def _block_windows(model: nn.Module) -> List[int]:
    """The partition size of every block as timm built it (0: global), remembered when windows are given."""
    return [int(getattr(b, 'sam_window_size', b.window_size)) for b in model.blocks]


def sam_pattern(model: nn.Module, grid: Tuple[int, int] = None) -> WindowSpec:
    """SAM's own windows of a ``VisionTransformerSAM`` (or its WinfT) as a spec: partition windows of its
    ``window_size`` in the windowed blocks, global blocks where timm has them."""
    grid = tuple(grid or model.patch_embed.grid_size)
    sizes = _block_windows(model)
    sched = ['global' if s == 0 else f'partition({s})' for s in sizes]
    return WindowSpec.from_schedule(grid, sched, {'kind': 'prior', 'reason': "SAM's own pattern (partition windows "
                                                 'and global blocks, as the model was built)'})


class WinfTSam(WinfTMixin, VisionTransformerSAM):
    """timm's ``VisionTransformerSAM`` with per-patch attention windows (no prefix tokens).

    Args:
        windows, attn_backend, window_resize: as in :class:`vitfree.WinfT`.
        **kwargs: everything :class:`timm.models.vision_transformer_sam.VisionTransformerSAM` takes.
    """
    __jit_unused_properties__ = list(getattr(VisionTransformerSAM, '__jit_unused_properties__', [])) + [
        'window_spec', '_model_args']

    def _windowed_layer(self, attn: nn.Module) -> WindowSamAttention:
        blk = next(b for b in self.blocks if b.attn is attn)
        if attn.rope is not None:
            raise ValueError('SAM encoders with rotary embeddings (use_rope=True) cannot be given windows: their rope '
                             'tables are made for one partition; vitfree supports SAM with relative position bias '
                             '(use_rel_pos=True) or none')
        layer = WindowSamAttention.from_attention(attn, None, 0, self.attn_backend)
        layer.rel_pos_as_timm = blk.window_size == 0  # a table timm reads over the whole grid
        blk.sam_window_size = blk.window_size
        blk.window_size = 0  # the block's own partition is off: the windows do its work
        return layer

    def _prefix_tokens(self) -> int:
        return 0

    def _grid_source(self) -> nn.Module:
        return self.patch_embed  # SAM takes any image size: every input's grid comes from its patches


register_family(Family('sam', VisionTransformerSAM, WinfTSam, filter_fn=checkpoint_filter_fn))

default_cfgs = generate_default_cfgs({
    'winft_samvit_base_patch16.sa1b': timm_weights_cfg('samvit_base_patch16.sa1b', notes=(
        'Weights: timm samvit_base_patch16.sa1b, trained with SAM\'s own windows (14x14 partitions, global blocks '
        '2, 5, 8, 11). Windows: the prior spec in model_args.windows is that pattern; the WinfT then differs from '
        'SAM only where SAM attends to the zero padding of the cells cut by the 64x64 grid edge.',
        'Per-patch windows of the same area without global blocks: windows=\'winft_local_sam_d12_g64\' (imposed '
        'on these weights without retraining; not measured). Measure windows: vitfree erf samvit_base_patch16 DATA '
        '--pretrained -o spec.yaml; fine-tune with them: vitfree finetune samvit_base_patch16 DATA --pretrained '
        '--windows spec.yaml.')),
})


@register_model
def winft_samvit_base_patch16(pretrained: bool = False, **kwargs) -> WinfTSam:
    """SAM ViT-B/16 image encoder (timm's ``samvit_base_patch16``, 1024 px) with windows."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11],
                      window_size=14, use_rel_pos=True, img_size=1024, windows='winft_prior_sam_d12_g64')
    return build_winft(WinfTSam, 'winft_samvit_base_patch16', pretrained, **dict(model_args, **kwargs))
