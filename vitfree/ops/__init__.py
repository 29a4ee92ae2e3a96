"""Functional windowed attention: ``(q, k, v, windows) -> out``, one file per backend, one
dispatcher (:mod:`vitfree.ops.dispatch`).

Backends: ``tiled`` (linear in the number of patches, any device), ``dense`` (SDPA with the full
mask, the reference), ``global`` (unmasked SDPA, only for windows that cover the whole grid),
``xformers`` (CUDA, when xformers is installed: tiles against their halo of keys in one
memory-efficient-attention call, linear), ``xformers-dense`` (the same kernel with the whole mask
as a bias, quadratic: small grids), ``sdpa-tiles`` (the batched tiles on PyTorch SDPA, any device,
chosen automatically only on CUDA) and ``flex`` (FlexAttention with a block-sparse mask built
from the windows, compiled on CUDA; chosen automatically only on CUDA).  ``eager`` is not a
kernel here: it names the attention layers' own explicit-softmax path, whose probabilities hooks
can read (:class:`vitfree.layers.WindowAttention`).  On CUDA the automatic choice uses costs
measured on the device (:mod:`vitfree.ops.calibration`).
"""
from . import calibration as _calibration
from .calibration import Calibration, calibration_for, set_calibration
from .dense import dense_prepare, dense_window_attention
from .dispatch import (
    Backend, BackendError, CostModel, QuerySpec, available_backends, choose_backend, current_backend, dense_cost,
    dense_work, estimate_costs, explain_choice, flex_cost, flex_work, fused_cost, fused_tiles_cost, fused_tiles_work,
    layer_backend, list_backends, prepare_backend, register_backend, resolve_backend, run_backend, tiled_cost_seconds,
    tiled_work, use_backend, window_attention, xformers_dense_cost,
    native_cost, qkv_entry,
)
from .flex import flex_plan, flex_prepare, flex_supports, flex_window_attention
from .full import covers_grid, full_attention, full_supports
from .native import native_prepare, native_qkv_attention, native_supports, native_window_attention
from .fused_tiles import choose_fused_tile, fused_tiles_prepare, sdpa_tiles_attention, tile_batch, tile_bias
from .tiled import TilePlan, choose_tile, plan_tiles, tiled_prepare, tiled_window_attention
from .xformers_attn import (
    window_bias, xformers_dense_attention, xformers_dense_prepare, xformers_inputs, xformers_prepare,
    xformers_supports, xformers_window_attention,
)

register_backend('dense', dense_window_attention, cost=dense_cost, prepare=dense_prepare, work=dense_work,
                 description='PyTorch SDPA with the dense window mask as a cached bias; O(T^2); the reference')
register_backend('tiled', tiled_window_attention, cost=tiled_cost_seconds, prepare=tiled_prepare, work=tiled_work,
                 description='tiles of queries against their halo of keys; O(T * window); any device')
register_backend('native', native_window_attention, supports=native_supports, cost=native_cost,
                 prepare=native_prepare, fn_qkv=native_qkv_attention,
                 description='compiled C++/OpenMP CPU kernel: each query visits only its window; O(T * window)')
register_backend('global', full_attention, supports=full_supports, cost=fused_cost, work=dense_work,
                 description='unmasked SDPA; only for windows that cover the whole grid')
register_backend('xformers', xformers_window_attention, supports=xformers_supports, cost=fused_tiles_cost,
                 prepare=xformers_prepare, work=fused_tiles_work,
                 description='xformers memory-efficient attention over batched tiles with per-tile window biases; '
                             'O(T * window); CUDA only')
register_backend('xformers-dense', xformers_dense_attention, supports=xformers_supports, cost=xformers_dense_cost,
                 prepare=xformers_dense_prepare, work=dense_work,
                 description='xformers memory-efficient attention with the whole window mask as a bias; O(T^2); '
                             'CUDA only')
register_backend('sdpa-tiles', sdpa_tiles_attention, cost=fused_tiles_cost, prepare=fused_tiles_prepare,
                 work=fused_tiles_work,
                 description='PyTorch SDPA over batched tiles with per-tile window biases; O(T * window); '
                             'chosen automatically on CUDA only')
register_backend('flex', flex_window_attention, supports=flex_supports, cost=flex_cost, prepare=flex_prepare,
                 work=flex_work,
                 description='FlexAttention with a block-sparse mask of the windows, tokens in tile-major order; '
                             'compiled on CUDA; chosen automatically on CUDA only')


def _auto_measure(device, name):
    # imported on first need: calibrate is also a script (python -m vitfree.ops.calibrate), and
    # importing it here would make runpy warn that it was imported before it ran
    from .calibrate import auto_calibrate
    return auto_calibrate(device, name)


_calibration._auto_measure = _auto_measure

__all__ = [
    'window_attention', 'dense_window_attention',
    'tiled_window_attention', 'xformers_window_attention', 'xformers_dense_attention', 'sdpa_tiles_attention',
    'flex_window_attention', 'full_attention', 'native_window_attention',
    'plan_tiles', 'choose_tile', 'TilePlan', 'covers_grid', 'window_bias', 'xformers_inputs', 'xformers_supports',
    'choose_fused_tile', 'tile_batch', 'tile_bias', 'flex_plan', 'flex_supports',
    'use_backend', 'current_backend', 'resolve_backend', 'choose_backend', 'available_backends',
    'list_backends', 'register_backend', 'Backend', 'BackendError', 'CostModel', 'estimate_costs',
    'explain_choice', 'layer_backend', 'prepare_backend', 'run_backend', 'QuerySpec', 'qkv_entry', 'native_cost',
    'Calibration', 'calibration_for', 'set_calibration',
]
