"""vitfree: window-free Vision Transformers (WinfT) for timm.

``import vitfree`` registers the ``winft_*`` models in timm's registry.
"""
from .version import __version__
from .windows import LayerWindows, WindowSpec, WindowSpecError, get_spec, list_specs, resolve_spec
from .ops import BackendError, available_backends, list_backends, use_backend, window_attention
from .layers import WindowAttention
from .models import WinfT, create_winft

__all__ = [
    '__version__', 'WindowSpec', 'LayerWindows', 'WindowSpecError', 'get_spec', 'list_specs', 'resolve_spec',
    'use_backend', 'window_attention', 'available_backends', 'list_backends', 'BackendError',
    'WindowAttention', 'WinfT', 'create_winft',
]


# analysis entry points load on first use (they pull in matplotlib, tqdm, ...)
_LAZY = {
    'record': 'vitfree.analysis.capture',
    'Recorder': 'vitfree.analysis.capture',
    'interaction': 'vitfree.analysis.interaction',
    'measure_erf': 'vitfree.analysis.erf',
    'patch_removal': 'vitfree.analysis.removal',
    'distance_profiles': 'vitfree.analysis.profiles',
    'head_importance': 'vitfree.analysis.heads',
    'attention_patterns': 'vitfree.analysis.patterns',
    'semantic_interrelation': 'vitfree.analysis.semantic',
    'keypoint_guided_masks': 'vitfree.analysis.semantic',
    'analyze': 'vitfree.analysis.report',
    'finetune': 'vitfree.train.finetune',
    'save_pretrained': 'vitfree.hub',
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    import importlib
    return getattr(importlib.import_module(mod), name)
