"""vitfree: window-free Vision Transformers (WinfT) for timm.

``import vitfree`` registers the ``winft_*`` models in timm's registry.

Importing the package itself is light (no torch): every name below loads on first use, and the
models are registered as soon as timm is imported, before or after ``import vitfree``.  So
``vitfree --help`` answers without loading torch, and ``import vitfree, timm`` (in either order)
finds the ``winft_*`` models.
"""
import importlib
import sys

from .version import __version__

__all__ = [
    '__version__', 'WindowSpec', 'LayerWindows', 'WindowSpecError', 'get_spec', 'list_specs', 'resolve_spec',
    'use_backend', 'window_attention', 'available_backends', 'list_backends', 'BackendError',
    'WindowAttention', 'WinfT', 'WinfTEva', 'WinfTSam', 'WinfTBeit', 'create_winft', 'to_winft', 'is_winft',
]

# every public name -> the module that defines it; loaded on first use
_LAZY = {
    **{name: 'vitfree.windows' for name in ('WindowSpec', 'LayerWindows', 'WindowSpecError', 'get_spec',
                                            'list_specs', 'resolve_spec')},
    **{name: 'vitfree.ops' for name in ('use_backend', 'window_attention', 'available_backends', 'list_backends',
                                        'BackendError')},
    'WindowAttention': 'vitfree.layers',
    **{name: 'vitfree.models' for name in ('WinfT', 'WinfTEva', 'WinfTSam', 'WinfTBeit', 'create_winft', 'to_winft',
                                           'is_winft')},
    # analysis entry points (they pull in matplotlib, tqdm, ...)
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


_SUBMODULES = ('windows', 'ops', 'layers', 'weights', 'models', 'analysis', 'hub', 'train', 'data', 'demo', 'cli',
               'commands')


def __getattr__(name):
    if name in _SUBMODULES:  # `vitfree.ops.use_backend(...)` after a plain `import vitfree`
        return importlib.import_module(f'{__name__}.{name}')
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(mod), name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


# ---- registration in timm's model registry ----------------------------------------------------
def _register_models() -> None:
    importlib.import_module('vitfree.models')  # its @register_model entries run on import


class _RegisterAfterTimm:
    """A one-shot import hook: when ``timm`` is imported after ``import vitfree``, the models are
    registered right after timm's own ``__init__`` has run (timm imports torch, which ``import
    vitfree`` alone must not)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, 'find_spec'):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister:
    """Loader wrapper: run timm's loader, then register the models; everything else is delegated."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_models()

    def __getattr__(self, name):
        return getattr(self._loader, name)


if 'timm' in sys.modules:
    _register_models()
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
