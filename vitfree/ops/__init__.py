"""Functional windowed attention: ``(q, k, v, windows) -> out``, one file per backend, one
dispatcher (:mod:`vitfree.ops.dispatch`)."""
from .dense import dense_window_attention
from .dispatch import (
    Backend, BackendError, available_backends, choose_backend, current_backend, list_backends,
    register_backend, resolve_backend, use_backend, window_attention,
)
from .eager import eager_attention_probs, eager_window_attention

register_backend('dense', dense_window_attention,
                 description='PyTorch SDPA with a dense boolean mask; O(T^2); the reference')
register_backend('eager', eager_window_attention,
                 description='explicit softmax; exposes the probabilities; O(T^2) memory')

__all__ = [
    'window_attention', 'dense_window_attention', 'eager_window_attention', 'eager_attention_probs',
    'use_backend', 'current_backend', 'resolve_backend', 'choose_backend', 'available_backends',
    'list_backends', 'register_backend', 'Backend', 'BackendError',
]
