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

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..layers import WindowAttention
from ..windows import WindowSpec, WindowSpecError, resolve_spec

__all__ = ['WinfT', 'create_winft']

_logger = logging.getLogger(__name__)
SpecLike = Union[WindowSpec, Mapping[str, Any], str, None]


class WinfT(VisionTransformer):
    """timm's VisionTransformer with per-patch attention windows.

    Args:
        windows: a :class:`WindowSpec`, its ``to_dict()`` form, a path to a ``.yaml``/``.json``
            spec, or the name of a shipped spec (``vitfree.list_specs()``).  ``None`` makes every
            block global (the model is then exactly a ViT).  A spec made for another patch grid
            is resized to this model's grid.
        attn_backend: attention backend for every windowed block (default ``'auto'``).
        **kwargs: everything :class:`timm.models.VisionTransformer` takes.
    """

    def __init__(self, windows: SpecLike = None, attn_backend: Optional[str] = None, **kwargs) -> None:
        attn_layer = kwargs.pop('attn_layer', WindowAttention)
        if not (isinstance(attn_layer, type) and issubclass(attn_layer, WindowAttention)):
            raise ValueError(f'WinfT needs a WindowAttention attn_layer, got {attn_layer!r}')
        super().__init__(attn_layer=attn_layer, **kwargs)
        self._init_windows(windows, attn_backend)

    # ---- windows ------------------------------------------------------------------------
    def _init_windows(self, windows: SpecLike, attn_backend: Optional[str]) -> None:
        grid = tuple(self.patch_embed.grid_size)
        spec = resolve_spec(windows)
        if spec is None:
            spec = WindowSpec.all_global(len(self.blocks), grid)
        if spec.depth != len(self.blocks):
            raise WindowSpecError(f'window spec has {spec.depth} blocks but the model has depth {len(self.blocks)}')
        if spec.grid != grid:
            _logger.info(f'Resizing window spec from grid {spec.grid} to the model grid {grid}.')
            spec = spec.resize(grid)
        num_heads = self.blocks[0].attn.num_heads
        spec.check_compatible(len(self.blocks), grid, num_heads)
        self._window_spec = spec
        self.attn_backend = attn_backend
        shared: Dict[Any, Any] = {}  # blocks with identical windows share one LayerWindows (and its caches)
        for i, blk in enumerate(self.blocks):
            if not isinstance(blk.attn, WindowAttention):
                raise TypeError(f'blocks[{i}].attn is {type(blk.attn).__name__}, not WindowAttention')
            ext = spec.blocks[i]
            key = None if ext is None else (ext.shape, ext.tobytes())
            if key not in shared:
                shared[key] = spec.layer(i)
            blk.attn.set_windows(shared[key], num_prefix_tokens=self.num_prefix_tokens)
            blk.attn.backend = attn_backend
        # keep a serialisable form for timm's config export (hub)
        self._model_args = dict(getattr(self, '_model_args', {}), windows=spec.to_dict())

    @property
    def window_spec(self) -> WindowSpec:
        """The window spec at the model's native patch grid."""
        return self._window_spec

    def set_window_spec(self, windows: SpecLike) -> None:
        """Swap the windows (e.g. after measuring ERFs); weights are untouched."""
        self._init_windows(windows, self.attn_backend)

    def set_attn_backend(self, backend: Optional[str]) -> None:
        """Backend for every windowed block (``None``/``'auto'`` lets the dispatcher choose)."""
        self.attn_backend = backend
        for blk in self.blocks:
            blk.attn.backend = backend

    def attn_backends(self) -> list:
        """Which backend each block ran in the last forward (``'global'`` for global blocks)."""
        return [blk.attn.last_backend for blk in self.blocks]

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        grid = tuple(self.patch_embed.grid_size)
        if grid != self._window_spec.grid:
            self._init_windows(self._window_spec.resize(grid), self.attn_backend)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:
            # x is NHWC here: tell the attention layers the grid of this input
            grid = (x.shape[1], x.shape[2])
            for blk in self.blocks:
                blk.attn.grid = grid
        return super()._pos_embed(x)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
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


def _weights_file(name: str) -> str:
    """Absolute path of a shipped checkpoint (source checkout or installed wheel)."""
    here = Path(__file__).resolve().parent.parent
    for d in (here.parent / 'weights', here / '_weights'):
        if (d / name).is_file():
            return str(d / name)
    return str(here.parent / 'weights' / name)


def _micro_cfg(weights: str, **kwargs) -> Dict[str, Any]:
    return _cfg(file=_weights_file(weights), num_classes=10, input_size=(3, 28, 28), crop_pct=1.0,
                interpolation='bilinear', mean=FMNIST_MEAN, std=FMNIST_STD, license='apache-2.0', **kwargs)


default_cfgs.update(generate_default_cfgs({
    'winft_micro_patch2_28.fmnist': _micro_cfg('winft_micro_patch2_28.fmnist.safetensors'),
    'vit_micro_patch2_28.fmnist': _micro_cfg('vit_micro_patch2_28.fmnist.safetensors'),
}))

MICRO_ARGS = dict(img_size=28, patch_size=2, in_chans=3, num_classes=10, embed_dim=64, depth=6, num_heads=4)


def _create_winft(variant: str, pretrained: bool = False, **kwargs) -> WinfT:
    from ..hub import prepare_factory_kwargs  # spec from config.json checked; safe, sha256-checked weights
    kwargs = prepare_factory_kwargs(variant, pretrained, kwargs)
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        WinfT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


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
    from ..hub import prepare_factory_kwargs  # shipped weights: sha256-checked against weights/manifest.json
    kwargs = prepare_factory_kwargs('vit_micro_patch2_28', pretrained, kwargs)
    return build_model_with_cfg(VisionTransformer, 'vit_micro_patch2_28', pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter'),
                                **dict(MICRO_ARGS, **kwargs))


# ---- any timm ViT-family architecture ------------------------------------------------------
def create_winft(
        base: str,
        windows: SpecLike = None,
        pretrained: bool = False,
        attn_backend: Optional[str] = None,
        **kwargs,
) -> WinfT:
    """Build the WinfT of any timm ViT/DeiT architecture (patch tokens plus a class token and/or
    register tokens, timm's ``VisionTransformer`` class).

    ``pretrained=True`` loads that architecture's timm weights strictly (through timm's own
    pretrained path: Hub, ``local-dir:``, ``pretrained_cfg_overlay=dict(file=...)``); the
    windows are then set on top.  ``windows`` as in :class:`WinfT`.
    """
    import timm

    if not isinstance(base, str):
        raise TypeError(f'base must be a timm model name, got {type(base).__name__}')
    arch = base.split('.')[0]
    if arch.startswith(('hf-hub:', 'local-dir:')):
        pass
    elif not timm.is_model(arch):
        raise ValueError(f'unknown timm model {base!r}; ViT-family names look like '
                         f'vit_small_patch16_224 or deit_tiny_patch16_224')
    if arch.startswith('winft_'):
        return timm.create_model(base, pretrained=pretrained, windows=windows, attn_backend=attn_backend, **kwargs)
    if pretrained and arch.startswith('hf-hub:'):  # never fall back to a pickle from the Hub
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, hf_hub_filename='model.safetensors')
        kwargs['pretrained_cfg_overlay'] = overlay
    elif pretrained and not arch.startswith('local-dir:'):
        from ..hub import prepare_factory_kwargs
        kwargs = prepare_factory_kwargs(base, pretrained, kwargs)
    try:
        model = timm.create_model(base, pretrained=pretrained, attn_layer=WindowAttention, **kwargs)
    except TypeError as e:
        raise ValueError(f'{base!r} is not a timm VisionTransformer with a replaceable attention layer '
                         f'({e}); WinfT supports vit_* and deit_* models of patch-token type') from None
    if type(model) is not VisionTransformer:
        raise ValueError(f'{base!r} builds a {type(model).__name__}, not a plain timm VisionTransformer; '
                         f'WinfT supports vit_* and deit_* models of patch-token type (not distilled or '
                         f'feature-wrapped ones)')
    if not all(isinstance(b.attn, WindowAttention) for b in model.blocks):
        raise ValueError(f'{base!r} ignores attn_layer; WinfT cannot replace its attention')
    model.__class__ = WinfT  # same modules and state, WinfT behaviour on top
    model._init_windows(windows, attn_backend)
    args = {k: v for k, v in getattr(model, '_model_args', {}).items() if k != 'attn_layer'}
    model._model_args = dict(args, base=base, windows=model.window_spec.to_dict())
    return model


@register_model
def vitfree_winft(pretrained: bool = False, base: str = 'vit_small_patch16_224', windows: SpecLike = None,
                  **kwargs) -> WinfT:
    """Registry entry for a WinfT built on any timm ViT architecture (``base``); this is what
    ``config.json`` names when such a model is saved, so ``local-dir:``/``hf-hub:`` rebuild it."""
    from ..hub import prepare_factory_kwargs  # a malformed spec in config.json is named as such
    kwargs = prepare_factory_kwargs(base, False, dict(kwargs, windows=windows))
    kwargs.pop('pretrained_model_args', None)
    windows = kwargs.pop('windows')
    return create_winft(base, windows=windows, pretrained=pretrained, **kwargs)
