"""Window-free Vision Transformer (WinfT).

A WinfT is timm's ``VisionTransformer`` in which the attention of every block is a
:class:`~vitfree.layers.WindowAttention`: each patch query attends to the prefix tokens and
to the patches inside its own window, a rectangle that differs per patch and per block (and
may differ per head).  The windows are not parameters, so a WinfT has exactly the state dict
of the ViT of the same shape, and timm ViT/DeiT checkpoints load into it strictly.

Models registered here (after ``import vitfree``): ``winft_{tiny,small,base}_patch16_{224,384}``.
Their pretrained tags point at the timm DeiT / AugReg ViT weights of the same shape on the
Hugging Face Hub; the windows come from the spec named in ``configs/``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Union

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..data import FASHION_MNIST_CLASSES
from ..layers import WindowAttention
from ..weights import manifest_cfg_fields, prepare_factory_kwargs, shipped_weights_file
from ..windows import WindowSpec
from .build import Family, WinfTMixin, build_winft, create_winft, prior_notes, register_family, to_winft

__all__ = ['WinfT', 'create_winft', 'to_winft']

SpecLike = Union[WindowSpec, Mapping[str, Any], str, None]


class WinfT(WinfTMixin, VisionTransformer):
    """timm's VisionTransformer with per-patch attention windows.

    Args:
        windows: a :class:`WindowSpec`, its ``to_dict()`` form, a path to a ``.yaml``/``.json``
            spec, or the name of a shipped spec (``vitfree.list_specs()``).  ``None`` makes every
            block global (the model is then exactly a ViT).  A spec made for another patch grid
            is resized to this model's grid (with a warning).
        attn_backend: attention backend for every windowed block (default ``'auto'``).
        window_resize: how windows follow another grid (a spec made for another grid,
            ``set_input_size``, ``dynamic_img_size``): ``'scale'`` (default: a window keeps its
            share of the image, as when the spec was measured) or ``'keep'`` (a window keeps its
            size in patches, so the cost stays linear at high resolution).
        **kwargs: everything :class:`timm.models.VisionTransformer` takes.
    """
    __jit_unused_properties__ = list(getattr(VisionTransformer, '__jit_unused_properties__', [])) + [
        'window_spec', '_model_args']

    def _windowed_layer(self, attn: nn.Module) -> WindowAttention:
        return WindowAttention.from_attention(attn, None, self.num_prefix_tokens, self.attn_backend)


register_family(Family('vit', VisionTransformer, WinfT, filter_fn=checkpoint_filter_fn))


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    if kwargs.get('hf_hub_id', '').startswith('timm/'):
        kwargs.setdefault('notes', prior_notes(kwargs['hf_hub_id']))
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


def _augreg(hub_id: str, **kwargs) -> Dict[str, Any]:
    return _cfg(hf_hub_id=hub_id, mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD, **kwargs)


# Pretrained tags load timm's own checkpoints of the same shape; the windows come from configs/.
default_cfgs = generate_default_cfgs({
    'winft_tiny_patch16_224.fb_in1k': _cfg(hf_hub_id='timm/deit_tiny_patch16_224.fb_in1k'),
    'winft_tiny_patch16_224.augreg_in21k_ft_in1k': _augreg('timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'),
    'winft_small_patch16_224.fb_in1k': _cfg(hf_hub_id='timm/deit_small_patch16_224.fb_in1k'),
    'winft_small_patch16_224.augreg_in21k_ft_in1k': _augreg('timm/vit_small_patch16_224.augreg_in21k_ft_in1k'),
    'winft_base_patch16_224.fb_in1k': _cfg(hf_hub_id='timm/deit_base_patch16_224.fb_in1k'),
    'winft_base_patch16_224.augreg2_in21k_ft_in1k': _augreg('timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    'winft_tiny_patch16_384.augreg_in21k_ft_in1k': _augreg(
        'timm/vit_tiny_patch16_384.augreg_in21k_ft_in1k', input_size=(3, 384, 384), crop_pct=1.0),
    'winft_small_patch16_384.augreg_in21k_ft_in1k': _augreg(
        'timm/vit_small_patch16_384.augreg_in21k_ft_in1k', input_size=(3, 384, 384), crop_pct=1.0),
    'winft_base_patch16_384.fb_in1k': _cfg(
        hf_hub_id='timm/deit_base_patch16_384.fb_in1k', input_size=(3, 384, 384), crop_pct=1.0),
})


# Micro models for 28x28 grey images given as RGB (Fashion-MNIST), 14x14 patch grid; their weights
# are trained by benchmarks/fmnist_study.py and shipped in weights/ (see weights/manifest.json).
FMNIST_MEAN, FMNIST_STD = (0.2860,) * 3, (0.3530,) * 3  # grey images replicated to RGB


def _micro_cfg(weights: str, **kwargs) -> Dict[str, Any]:
    return _cfg(file=shipped_weights_file(weights), num_classes=10, input_size=(3, 28, 28), crop_pct=1.0,
                interpolation='bilinear', mean=FMNIST_MEAN, std=FMNIST_STD, label_names=FASHION_MNIST_CLASSES,
                license='apache-2.0', **{**manifest_cfg_fields(weights), **kwargs})


default_cfgs.update(generate_default_cfgs({
    'winft_micro_patch2_28.fmnist': _micro_cfg('winft_micro_patch2_28.fmnist.safetensors'),
    'vit_micro_patch2_28.fmnist': _micro_cfg('vit_micro_patch2_28.fmnist.safetensors'),
}))

MICRO_ARGS = dict(img_size=28, patch_size=2, in_chans=3, num_classes=10, embed_dim=64, depth=6, num_heads=4)


def _create_winft(variant: str, pretrained: bool = False, **kwargs) -> WinfT:
    return build_winft(WinfT, variant, pretrained, **kwargs)


@register_model
def winft_tiny_patch16_224(pretrained: bool = False, **kwargs) -> WinfT:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, windows='winft_prior_d12_g14')
    return _create_winft('winft_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def winft_small_patch16_224(pretrained: bool = False, **kwargs) -> WinfT:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, windows='winft_prior_d12_g14')
    return _create_winft('winft_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def winft_base_patch16_224(pretrained: bool = False, **kwargs) -> WinfT:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, windows='winft_prior_d12_g14')
    return _create_winft('winft_base_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def winft_tiny_patch16_384(pretrained: bool = False, **kwargs) -> WinfT:
    model_args = dict(img_size=384, patch_size=16, embed_dim=192, depth=12, num_heads=3, windows='winft_prior_d12_g24')
    return _create_winft('winft_tiny_patch16_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def winft_small_patch16_384(pretrained: bool = False, **kwargs) -> WinfT:
    model_args = dict(img_size=384, patch_size=16, embed_dim=384, depth=12, num_heads=6, windows='winft_prior_d12_g24')
    return _create_winft('winft_small_patch16_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def winft_base_patch16_384(pretrained: bool = False, **kwargs) -> WinfT:
    model_args = dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12, windows='winft_prior_d12_g24')
    return _create_winft('winft_base_patch16_384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def winft_micro_patch2_28(pretrained: bool = False, **kwargs) -> WinfT:
    model_args = dict(MICRO_ARGS, windows='winft_micro_fmnist')
    return _create_winft('winft_micro_patch2_28', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_micro_patch2_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The plain ViT baseline of the same shape as ``winft_micro_patch2_28`` (defined by vitfree)."""
    kwargs = prepare_factory_kwargs('vit_micro_patch2_28', pretrained, kwargs, filter_fn=checkpoint_filter_fn)
    return build_model_with_cfg(VisionTransformer, 'vit_micro_patch2_28', pretrained,
                                feature_cfg=dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter'),
                                **dict(MICRO_ARGS, **kwargs))


@register_model
def vitfree_winft(pretrained: bool = False, base: str = 'vit_small_patch16_224', windows: SpecLike = None,
                  **kwargs) -> nn.Module:
    """Registry entry for a WinfT built on any supported timm model (``base``); this is what
    ``config.json`` names when such a model is saved, so ``local-dir:``/``hf-hub:`` rebuild it."""
    return create_winft(base, windows=windows, pretrained=pretrained, **kwargs)
