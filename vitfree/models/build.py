"""One way to make a WinfT: build the timm model, then give its attention layers windows.

:func:`to_winft` is the mechanism.  It takes a model built by timm (any supported family), swaps
each block's attention module for the windowed layer of that family, which holds the very same
modules and parameters (so the state dict, and any weights already loaded, stay as they are),
and turns the model into the WinfT class of its family, which adds the window API.  Everything
particular to one family lives in its :class:`Family` record: the timm model class, the WinfT
class (a :class:`WinfTMixin` subclass of it that says where the attention layers are, how to
make the windowed layer, the patch grid and the prefix tokens), its checkpoint filter and its
feature-extraction config.  Families register themselves with :func:`register_family`.

Three callers, all thin: ``winft_*`` entry points (timm's ``build_model_with_cfg`` with the
WinfT class of the family), :func:`create_winft` (timm builds any supported model by its own
entry point, with its own weight loading, then :func:`to_winft`), and the ``vitfree_winft``
registry entry that ``config.json`` names for the latter.  timm's module globals are never
touched.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .._util import warn
from ..layers.window_attention import WindowedCore, is_fx_tracing
from ..weights import check_loaded_weights, secure_factory_kwargs
from ..windows import WindowSpec, check_resize_mode, resolve_spec

__all__ = ['WinfTMixin', 'Family', 'register_family', 'family_of', 'to_winft', 'create_winft', 'is_winft',
           'build_winft', 'timm_weights_cfg', 'prior_notes', 'UNSUPPORTED']

SpecLike = Union[WindowSpec, Mapping[str, Any], str, None]


class WinfTMixin:
    """The window API every WinfT has, whatever its timm family.

    A family's WinfT class (``class WinfT(WinfTMixin, VisionTransformer)``) says where its attention
    layers are (:meth:`_attention_slots`), how one becomes windowed (:meth:`_windowed_layer`), and
    the model's patch grid and prefix tokens; the rest is here."""
    __jit_unused_properties__ = ['window_spec', '_model_args']

    def __init__(self, windows: SpecLike = None, attn_backend: Optional[str] = None, window_resize: str = 'scale',
                 **kwargs) -> None:
        """Build the timm model of the family (``**kwargs`` as its class takes them), then give it windows."""
        timm_build(super().__init__, type(self).__name__, **kwargs)
        self._give_windows(windows, attn_backend, window_resize)

    # ---- what a family says -------------------------------------------------------------------
    def _attention_slots(self) -> List[Tuple[nn.Module, str]]:
        """``(parent, attribute)`` of each block's attention module, in block order."""
        return [(blk, 'attn') for blk in self.blocks]

    def _windowed_layer(self, attn: nn.Module) -> WindowedCore:
        raise NotImplementedError

    def _patch_grid(self) -> Tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def _prefix_tokens(self) -> int:
        return int(self.num_prefix_tokens)

    def _grid_source(self) -> Optional[nn.Module]:
        """The module whose NHWC output tells the patch grid of each input (dynamic image sizes)."""
        return self.patch_embed if getattr(self, 'dynamic_img_size', False) else None

    # ---- windows ------------------------------------------------------------------------------
    def _give_windows(self, windows: SpecLike, attn_backend: Optional[str], window_resize: str) -> None:
        """Swap the attention layers for windowed ones and set the windows (the one mechanism)."""
        self.window_resize = check_resize_mode(window_resize)
        self.attn_backend = attn_backend or 'auto'
        for parent, name in self._attention_slots():
            attn = getattr(parent, name)
            if not isinstance(attn, WindowedCore):
                setattr(parent, name, self._windowed_layer(attn))
        self._grid_hook = None
        source = self._grid_source()
        if source is not None:  # windowed blocks must know the grid of every input
            self._grid_hook = source.register_forward_hook(self._note_grid)
        self._source_spec: Optional[WindowSpec] = None
        self.set_window_spec(windows)

    @property
    def window_spec(self) -> WindowSpec:
        """The window spec at the model's current patch grid."""
        return self._window_spec

    def set_window_spec(self, windows: SpecLike) -> None:
        """Swap the windows (e.g. after measuring ERFs); weights are untouched.  A spec made for another
        patch grid is resized to the model's (``window_resize``), with a warning."""
        spec = resolve_spec(windows)
        depth, grid = len(self._attention_slots()), self._patch_grid()
        self._source_spec = spec if spec is not None else WindowSpec.all_global(depth, grid)
        self._apply_windows(announce=True)

    def _apply_windows(self, announce: bool) -> None:
        """Windows at the current grid, always resized from the spec as given (so round trips never compound)."""
        spec, grid, slots = self._source_spec, self._patch_grid(), self._attention_slots()
        if min(grid) < 1:
            pe = getattr(self, 'patch_embed', None)
            raise ValueError(f'an image of {tuple(getattr(pe, "img_size", ()) or ())} px is smaller than one '
                             f'{tuple(getattr(pe, "patch_size", ()) or ())} patch (patch grid {grid[0]}x{grid[1]}); '
                             f'use an image size of at least the patch size')
        if spec.grid != grid:
            if announce:
                warn(f'window spec made for a {spec.grid[0]}x{spec.grid[1]} patch grid is resized to the model grid '
                     f'{grid[0]}x{grid[1]} (window_resize={self.window_resize!r})')
            spec = spec.resize(grid, self.window_resize)
        spec.check_compatible(len(slots), grid, getattr(*slots[0]).num_heads)
        for i, (parent, name) in enumerate(slots):
            layer = getattr(parent, name)
            layer.set_windows(spec.layer(i), num_prefix_tokens=self._prefix_tokens(), resize_mode=self.window_resize)
            layer.set_grid(grid)  # global blocks too: a position bias is read at the grid
            layer.backend = self.attn_backend
        self._window_spec = spec

    def set_attn_backend(self, backend: Optional[str]) -> None:
        """Backend for every windowed block (``None``/``'auto'`` lets the dispatcher choose)."""
        self.attn_backend = backend or 'auto'
        for parent, name in self._attention_slots():
            getattr(parent, name).backend = self.attn_backend

    def attn_backends(self) -> list:
        """Which backend each block ran in the last forward (``'global'`` for global blocks)."""
        layers = [getattr(p, n) for p, n in self._attention_slots()]
        return ['global' if not a.windowed else a.last_backend for a in layers]

    def set_input_size(self, img_size=None, patch_size=None, **kwargs) -> None:
        """timm's ``set_input_size``; the windows follow the new grid, resized from the spec the model
        was given (``window_resize``), with a warning when they change."""
        super().set_input_size(img_size=img_size, patch_size=patch_size, **kwargs)
        if self._patch_grid() != self._window_spec.grid:
            self._apply_windows(announce=True)

    def _note_grid(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        """Forward hook on the patch embedding (dynamic image sizes): its NHWC output tells the windowed
        blocks the patch grid of this input, whichever entry point was called."""
        if is_fx_tracing() or out.dim() != 4:
            return
        grid = (int(out.shape[1]), int(out.shape[2]))
        for parent, name in self._attention_slots():
            getattr(parent, name).grid = grid

    def __prepare_scriptable__(self):
        """What ``torch.jit.script`` compiles: the model without its Python grid hook (a scripted model
        runs windowed blocks at the grid it was built for)."""
        if getattr(self, '_grid_hook', None) is None:
            return self
        source = self._grid_source()
        clone = copy.copy(self)
        clone._modules = OrderedDict(self._modules)
        for key, m in self._modules.items():
            if m is source:
                stripped = copy.copy(m)
                stripped._forward_hooks = OrderedDict()
                clone._modules[key] = stripped
        clone._grid_hook = None
        return clone

    # ---- what timm exports --------------------------------------------------------------------
    @property
    def _model_args(self) -> Dict[str, Any]:
        """The reconstruction arguments timm records (``timm.create_model`` sets them after the entry
        point returns): ``windows`` always as the spec's JSON form, so ``save_for_hf`` can write it."""
        args = dict(self.__dict__.get('_winft_model_args', {}))
        args.pop('attn_backend', None)
        args.pop('window_resize', None)
        if hasattr(self, '_window_spec'):
            args['windows'] = self._window_spec.to_dict()
        if getattr(self, 'attn_backend', 'auto') not in (None, 'auto'):
            args['attn_backend'] = self.attn_backend
        if getattr(self, 'window_resize', 'scale') != 'scale':
            args['window_resize'] = self.window_resize
        for key in ('attn_layer', 'pretrained_model_args', 'cache_dir'):
            args.pop(key, None)
        return args

    @_model_args.setter
    def _model_args(self, args: Mapping[str, Any]) -> None:
        self.__dict__['_winft_model_args'] = dict(args)


def is_winft(model: Any) -> bool:
    return isinstance(model, WinfTMixin)


# ---- families -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One timm model family that can be given windows."""
    name: str
    timm_class: type
    winft_class: type
    filter_fn: Optional[Callable] = None       # the family's checkpoint filter (timm's ``checkpoint_filter_fn``)
    feature_cls: str = 'getter'                 # timm's feature wrapper for ``features_only``
    default_out_indices: Any = 3


_FAMILIES: Dict[type, Family] = {}

# timm model classes that cannot be given windows exactly, and why (named by create_winft and to_winft)
UNSUPPORTED: Dict[str, str] = {
    'NaFlexVit': ('NaFlexVit runs padded sequences of patches whose grid differs from sample to sample, and vitfree '
                  'windows are given per model grid (one grid per forward pass); for variable image sizes use a '
                  'VisionTransformer or Eva model with dynamic_img_size=True'),
}


def register_family(family: Family) -> Family:
    _FAMILIES[family.timm_class] = family
    _FAMILIES[family.winft_class] = family
    return family


def family_of(model: nn.Module, what: str = 'model') -> Family:
    fam = _FAMILIES.get(type(model))
    if fam is None:
        known = ', '.join(sorted({f.timm_class.__name__ for f in _FAMILIES.values()}))
        why = UNSUPPORTED.get(type(model).__name__)
        raise ValueError(f'{what} builds a {type(model).__name__}, which vitfree cannot give windows'
                         + (f' ({why})' if why else '') + f'; supported timm model classes: {known}')
    return fam


def build_winft(winft_class: type, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """A registered ``winft_*`` entry point: timm's ``build_model_with_cfg`` with the WinfT class of a
    family, its checkpoint filter (strict loading) and its feature-extraction config."""
    from timm.models import build_model_with_cfg

    from ..weights import prepare_factory_kwargs
    fam = _FAMILIES[winft_class]
    kwargs = prepare_factory_kwargs(variant, pretrained, kwargs, filter_fn=fam.filter_fn)
    out_indices = kwargs.pop('out_indices', fam.default_out_indices)
    return build_model_with_cfg(winft_class, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls=fam.feature_cls), **kwargs)


def prior_notes(hub_id: str) -> Tuple[str, ...]:
    """What a 224/384 tag is: timm weights trained without windows, with an unmeasured prior spec imposed."""
    base = hub_id.split('/', 1)[-1]
    return (f'Weights: timm {base}, trained without windows. Windows: the unmeasured prior spec in '
            f'model_args.windows (see its provenance), imposed on these weights without retraining; accuracy '
            f'with those windows, before fine-tuning, has not been measured.',
            f'Measure windows for these weights: vitfree erf {base} DATA --pretrained -o spec.yaml; '
            f'fine-tune with them: vitfree finetune {base} DATA --pretrained --windows spec.yaml.')



def timm_weights_cfg(tagged_name: str, **overrides: Any) -> Dict[str, Any]:
    """The pretrained config of a ``winft_*`` tag that loads timm's own weights ``tagged_name`` (timm's
    config for them, with :func:`prior_notes` and ``overrides``)."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(tagged_name)
    if cfg is None:
        raise ValueError(f'timm has no pretrained config {tagged_name!r}')
    out = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ('tag', 'architecture')}
    out.setdefault('hf_hub_id', f'timm/{tagged_name}')
    out['notes'] = prior_notes(out['hf_hub_id'])
    out.update(overrides)
    return out


def to_winft(model: nn.Module, windows: SpecLike = None, attn_backend: Optional[str] = None,
             window_resize: str = 'scale') -> nn.Module:
    """Give a timm model of a supported family windows, in place: its attention layers become windowed
    layers holding the same parameters, and it becomes that family's WinfT class.  Returns the model."""
    fam = family_of(model)
    if not isinstance(model, fam.winft_class):
        model.__class__ = fam.winft_class
        if '_model_args' in model.__dict__:  # recorded by timm on the plain model: now behind the property
            model._model_args = model.__dict__.pop('_model_args')
    model._give_windows(windows, attn_backend, window_resize)
    return model


# ---- create_winft: any supported timm model by name -------------------------------------------------------
def _unwrapped_kwargs(kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """Split off timm's feature-extraction arguments (the WinfT is made first, then wrapped)."""
    kwargs = dict(kwargs)
    if not kwargs.pop('features_only', False):
        return kwargs, None
    return kwargs, {k: kwargs.pop(k) for k in ('out_indices', 'feature_cls', 'output_stride') if k in kwargs}


def timm_build(build: Callable[..., nn.Module], name: str, *args, **kwargs) -> nn.Module:
    """``build(*args, **kwargs)``, with timm's argument asserts (``dim should be divisible by num_heads``)
    turned into a ``ValueError`` that names the model and the arguments."""
    try:
        return build(*args, **kwargs)
    except AssertionError as e:
        shown = {k: v for k, v in kwargs.items() if k not in ('pretrained_cfg', 'pretrained_model_args')}
        raise ValueError(f'{name}: timm cannot build it with {shown}: {e}') from None


def wrap_features(model: nn.Module, variant: str, feature_args: Dict[str, Any]) -> nn.Module:
    """timm's own ``features_only`` wrapper around a built WinfT (its family's feature config)."""
    from timm.models import build_model_with_cfg
    fam = family_of(model)
    feature_cfg = dict(out_indices=feature_args.pop('out_indices', fam.default_out_indices), feature_cls=fam.feature_cls)
    return build_model_with_cfg(lambda **_: model, variant, False, pretrained_cfg=dict(model.pretrained_cfg),
                                feature_cfg=feature_cfg, features_only=True, **feature_args)


def create_winft(base: str, windows: SpecLike = None, pretrained: bool = False, attn_backend: Optional[str] = None,
                 window_resize: str = 'scale', **kwargs) -> nn.Module:
    """The WinfT of any supported timm model (``timm.list_models`` name, with or without a tag).

    timm builds the model by its own entry point, so everything ``timm.create_model`` takes works
    here too (``features_only=True``, ``img_size``, ``num_classes`` ...).  ``pretrained=True`` loads
    that model's timm weights through timm's own path, from a source vitfree has checked
    (safetensors from the network, hashes where recorded), and strictly: only the classifier may
    differ.  ``windows``, ``attn_backend`` and ``window_resize`` as in :class:`vitfree.WinfT`."""
    import timm

    if not isinstance(base, str):
        raise TypeError(f'base must be a timm model name, got {type(base).__name__}')
    arch = base.split('.')[0]
    check_resize_mode(window_resize)
    if arch.startswith(('winft_', 'vitfree_winft', 'hf-hub:', 'local-dir:')):
        return timm.create_model(base, pretrained=pretrained, windows=windows, attn_backend=attn_backend,
                                 window_resize=window_resize, **kwargs)
    if not timm.is_model(arch):
        raise ValueError(f'unknown timm model {base!r}; ViT-family names look like vit_small_patch16_224 or '
                         f'deit_tiny_patch16_224')
    kwargs, features = _unwrapped_kwargs(kwargs)
    kwargs = secure_factory_kwargs(base, pretrained, dict(kwargs, windows=windows))  # a spec from config.json decoded
    windows = kwargs.pop('windows')
    model = timm_build(timm.create_model, base, base, pretrained=pretrained, **kwargs)
    fam = family_of(model, f'{base!r}')
    if pretrained and kwargs.get('pretrained_strict', True):
        check_loaded_weights(model, model.pretrained_cfg, fam.filter_fn)
    to_winft(model, windows, attn_backend, window_resize)
    model._model_args = dict(model.__dict__.get('_winft_model_args', {}), base=base)
    model.pretrained_cfg = dict(model.pretrained_cfg, architecture='vitfree_winft')
    return wrap_features(model, base, features) if features is not None else model
