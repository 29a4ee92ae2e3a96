"""Fine-tuning: one loop for a single process and for ``torchrun``, with exact-resume checkpoints.

The names below load on first use, so :mod:`vitfree.train.options` (the table of valid option
ranges that ``vitfree finetune --help`` prints) can be read without loading torch."""
import importlib
import sys
import types

__all__ = ['FinetuneConfig', 'FinetuneResult', 'finetune', 'create_finetune_model', 'evaluate',
           'CheckpointError', 'CheckpointManager', 'load_checkpoint', 'save_checkpoint']

_LAZY = {**{name: 'vitfree.train.finetune' for name in ('FinetuneConfig', 'FinetuneResult', 'finetune',
                                                         'create_finetune_model', 'evaluate')},
         **{name: 'vitfree.train.checkpoint' for name in ('CheckpointError', 'CheckpointManager', 'load_checkpoint',
                                                           'save_checkpoint')}}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``vitfree.train.finetune`` is the function (as with an eager ``from .finetune import finetune``),
    not the submodule the import system would otherwise set on the package when it loads it."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)  # looked up through __getattr__ from now on
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
