"""Functional windowed attention: ``(q, k, v, windows) -> out``, one file per backend, one
dispatcher (:mod:`vitfree.ops.dispatch`).

Backends: ``tiled`` (linear in the number of patches, any device), ``dense`` (SDPA with the full
mask, the reference), ``global`` (unmasked SDPA, only for windows that cover the whole grid) and
``xformers`` (CUDA, when xformers is installed and has a kernel).  ``eager`` is not a kernel here:
it names the attention layers' own explicit-softmax path, whose probabilities hooks can read
(:class:`vitfree.layers.WindowAttention`).
"""
from .dense import dense_prepare, dense_window_attention
from .dispatch import (
    Backend, BackendError, CostModel, QuerySpec, available_backends, choose_backend, current_backend, dense_cost,
    estimate_costs, explain_choice, fused_cost, layer_backend, list_backends, prepare_backend, register_backend,
    native_cost, resolve_backend, run_backend, tiled_cost_seconds, use_backend, window_attention, xformers_cost,
)
from .full import covers_grid, full_attention, full_supports
from .native import native_prepare, native_qkv_attention, native_supports, native_window_attention
from .tiled import TilePlan, choose_tile, plan_tiles, tiled_prepare, tiled_window_attention
from .xformers_attn import window_bias, xformers_inputs, xformers_prepare, xformers_supports, xformers_window_attention

register_backend('dense', dense_window_attention, cost=dense_cost, prepare=dense_prepare,
                 description='PyTorch SDPA with the dense window mask as a cached bias; O(T^2); the reference')
register_backend('tiled', tiled_window_attention, cost=tiled_cost_seconds, prepare=tiled_prepare,
                 description='tiles of queries against their halo of keys; O(T * window); any device')
register_backend('native', native_window_attention, supports=native_supports, cost=native_cost,
                 prepare=native_prepare, fn_qkv=native_qkv_attention,
                 description='compiled C++/OpenMP CPU kernel: each query visits only its window; O(T * window)')
register_backend('global', full_attention, supports=full_supports, cost=fused_cost,
                 description='unmasked SDPA; only for windows that cover the whole grid')
register_backend('xformers', xformers_window_attention, supports=xformers_supports, cost=xformers_cost,
                 prepare=xformers_prepare,
                 description='xformers memory-efficient attention with an additive bias; CUDA only')

__all__ = [
    'window_attention', 'dense_window_attention',
    'tiled_window_attention', 'xformers_window_attention', 'full_attention', 'native_window_attention',
    'plan_tiles', 'choose_tile', 'TilePlan', 'covers_grid', 'window_bias', 'xformers_inputs', 'xformers_supports',
    'use_backend', 'current_backend', 'resolve_backend', 'choose_backend', 'available_backends',
    'list_backends', 'register_backend', 'Backend', 'BackendError', 'CostModel', 'estimate_costs',
    'explain_choice', 'layer_backend', 'prepare_backend', 'run_backend', 'QuerySpec',
]
