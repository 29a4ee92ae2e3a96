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

import contextlib
import copy
import logging
import threading
import warnings
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..data import FASHION_MNIST_CLASSES
from ..layers import WindowAttention, is_fx_tracing
from ..weights import prepare_factory_kwargs, shipped_weights_file
from ..windows import WindowSpec, WindowSpecError, check_resize_mode, resolve_spec

__all__ = ['WinfT', 'create_winft']

_logger = logging.getLogger(__name__)
SpecLike = Union[WindowSpec, Mapping[str, Any], str, None]


class WinfT(VisionTransformer):
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
    __jit_unused_properties__ = list(getattr(VisionTransformer, '__jit_unused_properties__', [])) + ['window_spec']

    def __init__(self, windows: SpecLike = None, attn_backend: Optional[str] = None, window_resize: str = 'scale',
                 **kwargs) -> None:
        attn_layer = kwargs.pop('attn_layer', WindowAttention)
        if not (isinstance(attn_layer, type) and issubclass(attn_layer, WindowAttention)):
            raise ValueError(f'WinfT needs a WindowAttention attn_layer, got {attn_layer!r}')
        super().__init__(attn_layer=attn_layer, **kwargs)
        # the architecture as built, for config.json (hub): every constructor argument but the layer class
        self._model_args = dict(kwargs)
        self.window_resize = check_resize_mode(window_resize)
        self._grid_hook = None
        if self.dynamic_img_size:  # windowed blocks must know the grid of every input
            self._grid_hook = self.patch_embed.register_forward_hook(self._note_grid)
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
            warnings.warn(f'window spec made for a {spec.grid[0]}x{spec.grid[1]} patch grid is resized to the model '
                          f'grid {grid[0]}x{grid[1]} (window_resize={self.window_resize!r})', stacklevel=3)
            spec = spec.resize(grid, self.window_resize)
        num_heads = self.blocks[0].attn.num_heads
        spec.check_compatible(len(self.blocks), grid, num_heads)
        self._window_spec = spec
        self.attn_backend = attn_backend
        shared: Dict[Any, Any] = {}  # blocks with identical windows share one LayerWindows (and its cache)
        for i, blk in enumerate(self.blocks):
            if not isinstance(blk.attn, WindowAttention):
                raise TypeError(f'blocks[{i}].attn is {type(blk.attn).__name__}, not WindowAttention')
            ext = spec.blocks[i]
            key = None if ext is None else (ext.shape, ext.tobytes())
            if key not in shared:
                shared[key] = spec.layer(i)
            blk.attn.set_windows(shared[key], num_prefix_tokens=self.num_prefix_tokens, resize_mode=self.window_resize)
            blk.attn.backend = attn_backend
        # keep a serialisable form for timm's config export (hub)
        self._model_args = dict(getattr(self, '_model_args', {}), windows=spec.to_dict())
        self._model_args.pop('window_resize', None)
        if self.window_resize != 'scale':
            self._model_args['window_resize'] = self.window_resize

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
        return ['global' if not blk.attn.windowed else blk.attn.last_backend for blk in self.blocks]

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        grid = tuple(self.patch_embed.grid_size)
        if grid != self._window_spec.grid:
            self._init_windows(self._window_spec.resize(grid, self.window_resize), self.attn_backend)

    def _note_grid(self, patch_embed: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        """Forward hook on ``patch_embed`` (``dynamic_img_size`` models): its NHWC output tells the
        windowed blocks the patch grid of this input, whichever entry point (``forward``,
        ``forward_features``, ``forward_intermediates``) was called."""
        if is_fx_tracing() or out.dim() != 4:
            return
        grid = (int(out.shape[1]), int(out.shape[2]))
        for blk in self.blocks:
            blk.attn.grid = grid

    def __prepare_scriptable__(self) -> 'WinfT':
        """What ``torch.jit.script`` compiles: the model without its Python grid hook (a scripted
        model runs windowed blocks at the grid it was built for)."""
        if self._grid_hook is None:
            return self
        clone = copy.copy(self)
        clone._modules = OrderedDict(self._modules)
        pe = copy.copy(self.patch_embed)
        pe._forward_hooks = OrderedDict()
        clone._modules['patch_embed'] = pe
        clone._grid_hook = None
        return clone


def _prior_notes(hub_id: str) -> Tuple[str, ...]:
    """What a 224/384 tag is: timm weights trained without windows, with an unmeasured prior spec imposed."""
    base = hub_id.split('/', 1)[-1]
    return (f'Weights: timm {base}, trained without windows. Windows: the unmeasured prior spec in '
            f'model_args.windows (see its provenance), imposed on these weights without retraining; accuracy '
            f'with those windows, before fine-tuning, has not been measured.',
            f'Measure windows for these weights: vitfree erf {base} DATA --pretrained -o spec.yaml; '
            f'fine-tune with them: vitfree finetune {base} DATA --pretrained --windows spec.yaml.')


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    if kwargs.get('hf_hub_id', '').startswith('timm/'):
        kwargs.setdefault('notes', _prior_notes(kwargs['hf_hub_id']))
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
FMNIST_LABELS = FASHION_MNIST_CLASSES  # the shipped models' label_names, in label order


def _micro_cfg(weights: str, **kwargs) -> Dict[str, Any]:
    return _cfg(file=shipped_weights_file(weights), num_classes=10, input_size=(3, 28, 28), crop_pct=1.0,
                interpolation='bilinear', mean=FMNIST_MEAN, std=FMNIST_STD, label_names=FMNIST_LABELS,
                license='apache-2.0', **kwargs)


default_cfgs.update(generate_default_cfgs({
    'winft_micro_patch2_28.fmnist': _micro_cfg('winft_micro_patch2_28.fmnist.safetensors'),
    'vit_micro_patch2_28.fmnist': _micro_cfg('vit_micro_patch2_28.fmnist.safetensors'),
}))

MICRO_ARGS = dict(img_size=28, patch_size=2, in_chans=3, num_classes=10, embed_dim=64, depth=6, num_heads=4)


def _create_winft(variant: str, pretrained: bool = False, **kwargs) -> WinfT:
    kwargs = prepare_factory_kwargs(variant, pretrained, kwargs, filter_fn=checkpoint_filter_fn)  # strict loading
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        WinfT,
        variant,
        pretrained,
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
    kwargs = prepare_factory_kwargs('vit_micro_patch2_28', pretrained, kwargs, filter_fn=checkpoint_filter_fn)
    return build_model_with_cfg(VisionTransformer, 'vit_micro_patch2_28', pretrained,
                                feature_cfg=dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter'),
                                **dict(MICRO_ARGS, **kwargs))


# ---- any timm ViT-family architecture ------------------------------------------------------
_BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def _build_vits_as_winft(**winft_kwargs: Any):
    """Within the context, model modules (timm's, and any other that builds through timm's
    ``build_model_with_cfg``) build WinfT wherever they would build a plain
    ``VisionTransformer``, with ``winft_kwargs`` added: so any timm ViT entry point, with all of
    timm's own handling (pretrained weights and their filter, ``features_only``, feature
    classes, ``local-dir:`` / ``hf-hub:`` sources), builds the WinfT of that architecture."""
    import sys
    from timm.models import _builder

    original = _builder.build_model_with_cfg

    def build(model_cls, variant, pretrained=False, **kwargs):
        if isinstance(model_cls, type) and issubclass(model_cls, WinfT):  # already a WinfT entry point
            return original(model_cls, variant, pretrained, **kwargs)
        if model_cls is not VisionTransformer:
            raise ValueError(f'{variant!r} builds a {getattr(model_cls, "__name__", model_cls)}, not a plain timm '
                             f'VisionTransformer; WinfT supports vit_* and deit_* models of patch-token type '
                             f'(not distilled, hybrid-class or NaFlex ones)')
        filter_fn = kwargs.pop('pretrained_filter_fn', None)
        kwargs = prepare_factory_kwargs(variant, pretrained, kwargs, filter_fn=filter_fn)  # strict, safe sources
        return original(WinfT, variant, pretrained, **kwargs, **winft_kwargs)

    with _BUILD_LOCK:
        patched = [m for m in list(sys.modules.values()) if getattr(m, 'build_model_with_cfg', None) is original]
        for m in patched:
            m.build_model_with_cfg = build
        try:
            yield
        finally:
            for m in patched:
                m.build_model_with_cfg = original


def create_winft(
        base: str,
        windows: SpecLike = None,
        pretrained: bool = False,
        attn_backend: Optional[str] = None,
        window_resize: str = 'scale',
        **kwargs,
) -> WinfT:
    """Build the WinfT of any timm ViT/DeiT architecture (patch tokens plus a class token and/or
    register tokens, timm's ``VisionTransformer`` class).

    The base's own timm entry point builds the model, so everything ``timm.create_model`` takes
    works here too (``features_only=True``, ``out_indices``, ``img_size``, ``num_classes`` ...).
    ``pretrained=True`` loads that architecture's timm weights strictly (through timm's own
    pretrained path: Hub, ``local-dir:``, ``pretrained_cfg_overlay=dict(file=...)``).
    ``windows``, ``attn_backend`` and ``window_resize`` as in :class:`WinfT`.
    """
    import timm

    if not isinstance(base, str):
        raise TypeError(f'base must be a timm model name, got {type(base).__name__}')
    arch = base.split('.')[0]
    if not arch.startswith(('hf-hub:', 'local-dir:')) and not timm.is_model(arch):
        raise ValueError(f'unknown timm model {base!r}; ViT-family names look like '
                         f'vit_small_patch16_224 or deit_tiny_patch16_224')
    winft_args = dict(windows=windows, attn_backend=attn_backend, window_resize=check_resize_mode(window_resize))
    if arch.startswith(('winft_', 'vitfree_winft')):
        return timm.create_model(base, pretrained=pretrained, **winft_args, **kwargs)
    with _build_vits_as_winft(**winft_args):
        model = timm.create_model(base, pretrained=pretrained, **kwargs)
    if kwargs.get('features_only'):  # a feature wrapper around the WinfT (or an FX graph of it)
        return model
    if not isinstance(model, WinfT):
        raise ValueError(f'{base!r} ignores the model class it is given; WinfT cannot replace its attention')
    model._model_args = dict(model._model_args, base=base)
    return model


@register_model
def vitfree_winft(pretrained: bool = False, base: str = 'vit_small_patch16_224', windows: SpecLike = None,
                  **kwargs) -> WinfT:
    """Registry entry for a WinfT built on any timm ViT architecture (``base``); this is what
    ``config.json`` names when such a model is saved, so ``local-dir:``/``hf-hub:`` rebuild it."""
    kwargs = prepare_factory_kwargs(base, False, dict(kwargs, windows=windows))
    kwargs.pop('pretrained_model_args', None)
    kwargs.pop('pretrained_filter_fn', None)  # the base's own entry point brings its filter (made strict there)
    windows = kwargs.pop('windows')
    return create_winft(base, windows=windows, pretrained=pretrained, **kwargs)
