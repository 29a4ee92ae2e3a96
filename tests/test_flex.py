"""The ``flex`` backend on CPU: token permutation, block-mask construction (against
``create_block_mask`` of the same mask), the mask function, and FlexAttention's numerics
(uncompiled; CPU FlexAttention has no backward, so gradients are checked in tests/test_cuda.py)."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitfree.ops import (
    available_backends, choose_backend, dense_window_attention, estimate_costs, flex_window_attention, window_attention,
)
from vitfree.ops.flex import FLEX_BLOCK, block_structure, flex_plan, tile_major_order, window_mask_mod
from vitfree.windows import LayerWindows

create_block_mask = pytest.importorskip('torch.nn.attention.flex_attention').create_block_mask

pytestmark = pytest.mark.usefixtures('one_thread')


def _windows(grid, per_head=False, heads=3, hi=3, seed=0):
    shape = ((heads,) if per_head else ()) + (*grid, 4)
    return LayerWindows(np.random.default_rng(seed).integers(0, hi + 1, size=shape), grid)


@pytest.mark.parametrize('grid,tile', [((7, 9), (2, 4)), ((16, 16), (8, 16)), ((5, 3), (8, 8)), ((1, 1), (1, 1))])
def test_tile_major_order_is_a_permutation_of_compact_tiles(grid, tile):
    order = tile_major_order(grid, tile)
    n = grid[0] * grid[1]
    assert sorted(order.tolist()) == list(range(n))
    ys, xs = np.divmod(order, grid[1])
    tile_id = (ys // tile[0]) * -(-grid[1] // tile[1]) + xs // tile[1]
    assert np.all(np.diff(tile_id) >= 0)  # tiles are contiguous, in order
    if grid == (16, 16):  # full 8x16 tiles: each 128-block is one tile
        first = order[:128]
        assert set(first // 16) == set(range(8)) and set(first % 16) == set(range(16))


@st.composite
def cases(draw):
    grid = (draw(st.integers(1, 14)), draw(st.integers(1, 14)))
    per_head = draw(st.booleans())
    return (_windows(grid, per_head, heads=draw(st.integers(1, 3)), hi=draw(st.sampled_from([0, 1, 3, 20])),
                     seed=draw(st.integers(0, 2 ** 16))),
            draw(st.integers(0, 2)), draw(st.sampled_from([(16, 16), (16, 32), (32, 16), (128, 128)])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_block_mask_equals_create_block_mask(case):
    """Our BlockMask (summed-area tables, no N x N mask) lists the same partial and full blocks as
    PyTorch's create_block_mask evaluating our mask_mod on every pair."""
    windows, prefix, block = case
    plan = flex_plan(windows, prefix, 'cpu', block)
    n, kv_len = windows.num_patches, plan.kv_index.numel()
    heads = windows.num_heads if windows.per_head else 1
    ref = create_block_mask(plan.block_mask.mask_mod, 1, heads, n, kv_len, device='cpu', BLOCK_SIZE=block)
    ours = plan.block_mask
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    for mine, theirs in ((ours.kv_indices, ref.kv_indices), (ours.full_kv_indices, ref.full_kv_indices)):
        count = (ours.kv_num_blocks if mine is ours.kv_indices else ours.full_kv_num_blocks)
        for idx in np.ndindex(*count.shape):
            c = int(count[idx])
            assert sorted(mine[idx][:c].tolist()) == sorted(theirs[idx][:c].tolist())


@pytest.mark.parametrize('per_head', [False, True])
@pytest.mark.parametrize('prefix', [0, 1, 2])
def test_mask_mod_is_the_window_mask_in_the_permuted_layout(per_head, prefix):
    windows = _windows((7, 9), per_head)
    plan = flex_plan(windows, prefix, 'cpu', (16, 16))
    mod = window_mask_mod(plan.tables, per_head)
    n, kv_len = windows.num_patches, plan.kv_index.numel()
    qi = torch.arange(n).view(n, 1)
    ki = torch.arange(kv_len).view(1, kv_len)
    dense = windows.mask(prefix)
    if not per_head:
        dense = dense.unsqueeze(0)
    assert kv_len == windows.num_patches + prefix
    for head in range(dense.shape[0]):
        got = mod(torch.tensor(0), torch.tensor(head), qi, ki)
        assert torch.equal(got, dense[head][plan.q_index][:, plan.kv_index])


def test_block_mask_is_sparse_for_small_windows():
    windows = LayerWindows(3, (64, 64))
    partial, full, kv_len = block_structure(windows, 1, tile_major_order((64, 64), (8, 16)),
                                            tile_major_order((64, 64), (8, 16)))
    assert kv_len == 4096 + 1
    visited = (partial | full).sum(-1)  # key blocks per query block: the tile, its 8 neighbours, the prefix
    assert visited.max() <= 10 and partial[0, :, -1].all()  # the prefix key shares the last block
    plan = flex_plan(windows, 1, 'cpu')
    assert plan.partial_blocks + plan.full_blocks <= 10 * 32


@pytest.mark.parametrize('per_head', [False, True])
@pytest.mark.parametrize('prefix', [0, 1, 2])
@pytest.mark.parametrize('grid', [(7, 9), (13, 11), (1, 1)])
def test_flex_forward_equals_dense_on_cpu(per_head, prefix, grid):
    windows = _windows(grid, per_head)
    q, k, v = (torch.randn(2, 3, prefix + windows.num_patches, 16, dtype=torch.float64) for _ in range(3))
    out = flex_window_attention(q, k, v, windows, prefix, scale=0.3)
    torch.testing.assert_close(out, dense_window_attention(q, k, v, windows, prefix, scale=0.3),
                               rtol=1e-10, atol=1e-10)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = flex_window_attention(q.float(), k.float(), v.float(), windows, prefix)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), dense_window_attention(q, k, v, windows, prefix), rtol=3e-2, atol=3e-2)


def test_auto_never_picks_flex_on_cpu_and_grad_is_refused():
    windows = LayerWindows(3, (64, 64))
    q = torch.empty(1, 6, 4097, 64)
    assert choose_backend(q, windows, 1) != 'flex'
    assert 'not chosen automatically on cpu' in estimate_costs(q, windows, 1)['flex']
    assert 'no backward pass on CPU' in estimate_costs(q.requires_grad_(), windows, 1)['flex']
    with torch.no_grad():
        assert 'flex' in available_backends(q, windows, 1)


def test_named_flex_runs_and_plan_is_cached():
    windows = _windows((6, 5))
    q, k, v = (torch.randn(1, 2, 31, 16) for _ in range(3))
    out = window_attention(q, k, v, windows, 1, backend='flex')
    torch.testing.assert_close(out, dense_window_attention(q, k, v, windows, 1), rtol=1e-5, atol=1e-5)
    assert flex_plan(windows, 1, 'cpu') is flex_plan(windows, 1, 'cpu')
    assert flex_plan(windows, 1, 'cpu').block_mask.BLOCK_SIZE == FLEX_BLOCK
