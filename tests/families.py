"""Tiny configurations of every supported timm family (random init, a few blocks, small odd grids), shared by
the family tests."""
import warnings

import numpy as np
import timm
import torch

import vitfree
from vitfree import WindowSpec

# name: (timm model, tiny kwargs, image size (H, W))
FAMILIES = {
    'eva02': ('eva02_tiny_patch14_224', dict(depth=3, embed_dim=48, num_heads=3), (70, 98)),  # 5x7, class token
    'dinov3': ('vit_small_patch16_dinov3', dict(depth=3, embed_dim=48, num_heads=3, init_values=None),
               (80, 112)),  # class + 4 register tokens, dynamic image size
    'pe': ('vit_pe_core_tiny_patch16_384', dict(depth=2, embed_dim=48, num_heads=3), (80, 112)),  # AttentionRope, map
    'rope_reg_gap': ('vit_betwixt_patch16_rope_reg4_gap_256', dict(depth=2, embed_dim=48, num_heads=3),
                     (80, 112)),  # register tokens only, average pooling
    'rope_mixed': ('vit_small_patch16_rope_mixed_224', dict(depth=2, embed_dim=48, num_heads=3), (80, 112)),
    'rope_gqa': ('vit_small_patch16_rope_224', dict(depth=2, embed_dim=48, num_heads=4, num_kv_heads=2,
                                                    qkv_fused=False), (80, 112)),  # grouped-query k/v heads
    'sam': ('samvit_base_patch16', dict(depth=3, embed_dim=48, num_heads=3, window_size=3, global_attn_indexes=(1,),
                                        neck_chans=16, num_classes=5), (80, 112)),  # no prefix token
    'beit': ('beit_base_patch16_224', dict(depth=3, embed_dim=48, num_heads=3), (80, 112)),
}
NAMES = list(FAMILIES)


def image_size(name):
    return FAMILIES[name][2]


def grid_of(name):
    h, w = image_size(name)
    p = 14 if name == 'eva02' else 16
    return h // p, w // p


def kwargs_of(name):
    _, kw, size = FAMILIES[name]
    return dict(kw, img_size=size)


def perturb(model, seed=0):
    """Weights large enough that attention is far from uniform (timm's init gives nearly uniform
    attention, which would hide any windowing mistake), deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[-1] ** 0.5))
            elif name.endswith(('norm.weight', 'norm1.weight', 'norm2.weight', 'gamma_1', 'gamma_2', 'gamma')):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def timm_model(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return perturb(timm.create_model(FAMILIES[name][0], **dict(kwargs_of(name), **kw))).eval()


def winft_of(name, windows=None, window_resize='scale', **kw):
    """The WinfT of the family with the weights of :func:`timm_model`."""
    ref = timm_model(name, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        m = vitfree.create_winft(FAMILIES[name][0], windows=windows, window_resize=window_resize,
                                 **dict(kwargs_of(name), **kw)).eval()
    m.load_state_dict(ref.state_dict())
    return m


def random_spec(name, per_head=True, seed=0, hi=2, global_blocks=()):
    """Random per-patch (and per-head) windows for every block but ``global_blocks``."""
    _, kw, _ = FAMILIES[name]
    grid, depth, heads = grid_of(name), kw['depth'], kw['num_heads']
    rng = np.random.default_rng(seed)
    shape = ((heads,) if per_head else ()) + (*grid, 4)
    blocks = ['global' if i in global_blocks else rng.integers(0, hi + 1, size=shape) for i in range(depth)]
    return WindowSpec(grid, blocks, {'kind': 'uniform', 'radius': 'random'})


def images(name, batch=2, seed=1):
    return torch.randn(batch, 3, *image_size(name), generator=torch.Generator().manual_seed(seed))
