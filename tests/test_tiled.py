"""The tiled backend equals the dense reference (outputs and gradients) on random windows."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitfree.ops import dense_window_attention, plan_tiles, tiled_window_attention, window_attention
from vitfree.ops.tiled import choose_tile, window_bounds
from vitfree.windows import LayerWindows, window_areas

pytestmark = pytest.mark.usefixtures('one_thread')


SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _inputs(b, heads, t, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, t, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _compare(windows, prefix, b=2, heads=2, d=8, tile=None, seed=0, atol=1e-5):
    t = prefix + windows.num_patches
    q, k, v = _inputs(b, heads, t, d, seed=seed)
    out = tiled_window_attention(q, k, v, windows, prefix, tile=tile)
    ref = dense_window_attention(q, k, v, windows, prefix)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, r in zip('qkv', grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=atol, msg=lambda m: f'grad {name}: {m}')


@st.composite
def window_cases(draw):
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    heads = draw(st.integers(1, 3))
    per_head = draw(st.booleans())
    max_ext = draw(st.integers(0, 5))
    shape = ((heads,) if per_head else ()) + (h, w, 4)
    seed = draw(st.integers(0, 2 ** 16))
    ext = np.random.default_rng(seed).integers(0, max_ext + 1, size=shape)
    prefix = draw(st.sampled_from([0, 1, 5]))
    tile = draw(st.one_of(st.none(), st.tuples(st.integers(1, 5), st.integers(1, 5))))
    return LayerWindows(ext, (h, w)), heads, prefix, tile, seed


@SETTINGS
@given(window_cases())
def test_tiled_equals_dense_random_windows(case):
    windows, heads, prefix, tile, seed = case
    _compare(windows, prefix, b=2, heads=heads, tile=tile, seed=seed)


@pytest.mark.parametrize('grid', [(7, 9), (13, 5), (1, 17), (17, 1), (1, 1), (14, 14)])
@pytest.mark.parametrize('prefix', [0, 1, 5])
def test_tiled_odd_grids(grid, prefix):
    rng = np.random.default_rng(sum(grid) + prefix)
    windows = LayerWindows(rng.integers(0, 4, size=(*grid, 4)), grid)
    _compare(windows, prefix, heads=3)


@pytest.mark.parametrize('tile', [(4, 4), (3, 5), (8, 8), (2, 16)])
def test_grid_not_a_multiple_of_the_tile(tile):
    windows = LayerWindows(np.random.default_rng(1).integers(0, 3, size=(2, 11, 13, 4)), (11, 13))
    plan = plan_tiles(windows, 1, tile)
    assert plan.num_tiles == -(-11 // plan.tile[0]) * -(-13 // plan.tile[1])
    _compare(windows, 1, heads=2, tile=tile)


def test_per_head_windows_differ_per_head():
    ext = np.stack([np.zeros((6, 6, 4), int), np.full((6, 6, 4), 2), np.array([0, 3, 1, 0]) + np.zeros((6, 6, 4), int)])
    _compare(LayerWindows(ext, (6, 6)), 1, heads=3)


def test_plan_masks_are_exact_rectangles():
    """Allowed keys per query row equal the window area (+ prefix); the halo holds every window."""
    rng = np.random.default_rng(3)
    windows = LayerWindows(rng.integers(0, 5, size=(2, 10, 7, 4)), (10, 7))
    for tile in [None, (3, 3), (4, 2)]:
        plan = plan_tiles(windows, 2, tile)
        allowed = plan.allowed.reshape(2, -1, plan.tile_keys)
        rows = torch.from_numpy(np.asarray(plan.out_index))  # tile row of each patch
        counts = allowed[:, rows].sum(-1).numpy()
        assert np.array_equal(counts, window_areas(windows.extents, windows.grid).reshape(2, -1) + 2)
        # every patch appears once as a query, padding rows point at patch N
        assert sorted(plan.out_index.tolist()) == sorted(set(plan.out_index.tolist()))
        assert int((plan.grad_index == windows.num_patches).sum()) == plan.num_tiles * plan.tile_queries - 70


def test_window_bounds_union_over_heads():
    ext = np.zeros((2, 3, 3, 4), int)
    ext[0, 1, 1] = [1, 0, 0, 0]
    ext[1, 1, 1] = [0, 0, 0, 2]
    r0, r1, c0, c1 = window_bounds(LayerWindows(ext, (3, 3)))
    assert (r0[1, 1], r1[1, 1], c0[1, 1], c1[1, 1]) == (0, 1, 1, 2)


def test_choose_tile_is_within_grid_and_cached():
    windows = LayerWindows(3, (64, 64))
    tile = choose_tile(windows, 1)
    assert 1 <= tile[0] <= 64 and 1 <= tile[1] <= 64
    assert choose_tile(windows, 1) is tile  # cached object
    assert choose_tile(LayerWindows(2, (1, 50)), 0)[0] == 1
    big = LayerWindows(20, (14, 14))  # covers the grid: a single tile is cheapest
    assert choose_tile(big, 1) == (14, 14)


@pytest.mark.parametrize('dtype,atol', [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_close_to_dense(dtype, atol):
    windows = LayerWindows(np.random.default_rng(0).integers(0, 3, size=(9, 7, 4)), (9, 7))
    q, k, v = _inputs(2, 2, 64, 16)
    lq, lk, lv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = tiled_window_attention(lq, lk, lv, windows, 1)
    assert out.dtype == dtype
    ref = dense_window_attention(q, k, v, windows, 1)
    torch.testing.assert_close(out.float(), ref.detach(), rtol=0, atol=atol)
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    for a, r in zip((lq, lk, lv), (q, k, v)):
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), r.grad, rtol=0, atol=10 * atol)


def test_cpu_autocast_bf16():
    windows = LayerWindows(2, (8, 8))
    q, k, v = _inputs(1, 2, 65, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = tiled_window_attention(q, k, v, windows, 1)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    ref = dense_window_attention(q, k, v, windows, 1)
    torch.testing.assert_close(out.float(), ref.detach(), rtol=0, atol=3e-2)


def test_strided_inputs_like_timm():
    """q/k/v as timm makes them: views into one (B, T, 3, heads, d) tensor."""
    windows = LayerWindows(1, (5, 6))
    qkv = torch.randn(2, 31, 3, 2, 8, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = tiled_window_attention(q, k, v, windows, 1)
    ref = dense_window_attention(q, k, v, windows, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    (g_ref,) = torch.autograd.grad(ref.sum(), qkv)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('per_head,budget', [(False, 500), (True, 500), (True, 5000), (False, 20000)])
def test_chunks_match(monkeypatch, per_head, budget):
    """Chunks over the batch and the heads (small logit budgets) give the same result."""
    import vitfree.ops.tiled as tiled
    monkeypatch.setattr(tiled, '_CHUNK_ELEMS', budget)
    shape = ((3,) if per_head else ()) + (7, 6, 4)
    windows = LayerWindows(np.random.default_rng(2).integers(0, 3, size=shape), (7, 6))
    chunks = tiled._chunks(plan_tiles(windows, 1), 5, 3)
    covered = sorted((b, h) for bs, hs in chunks for b in range(5)[bs] for h in range(3)[hs])
    assert covered == [(b, h) for b in range(5) for h in range(3)]
    if budget == 500:
        assert len(chunks) == 15  # one (image, head) per chunk
    _compare(windows, 1, b=5, heads=3)


def test_dropout_runs_and_backpropagates():
    windows = LayerWindows(1, (4, 4))
    q, k, v = _inputs(2, 2, 17, 8)
    torch.manual_seed(0)
    out = tiled_window_attention(q, k, v, windows, 1, dropout_p=0.5)
    out.sum().backward()
    assert out.shape == q.shape and torch.isfinite(q.grad).all()
    with torch.no_grad():  # dropout 0 on that path is the plain result
        assert torch.allclose(tiled_window_attention(q, k, v, windows, 1, dropout_p=1e-12),
                              dense_window_attention(q, k, v, windows, 1), atol=1e-5)


def test_gradcheck_float64():
    windows = LayerWindows(np.random.default_rng(5).integers(0, 3, size=(2, 3, 4, 4)), (3, 4))
    q, k, v = (torch.randn(1, 2, 13, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: tiled_window_attention(a, b, c, windows, 1), (q, k, v))


def test_errors_name_the_constraint():
    windows = LayerWindows(1, (4, 4))
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r'1 prefix tokens \+ 4x4 patches = 17'):
        tiled_window_attention(q, q, q, windows, 1)
    per_head = LayerWindows(np.zeros((3, 4, 4, 4), int), (4, 4))
    with pytest.raises(ValueError, match='per head for 3 heads'):
        tiled_window_attention(q, q, q, per_head, 0)
    with pytest.raises(ValueError, match='tile must be two positive ints'):
        tiled_window_attention(q, q, q, windows, 0, tile=(0, 3))


def test_dispatcher_runs_it_by_name():
    windows = LayerWindows(2, (6, 5))
    q, k, v = _inputs(1, 2, 31, 8)
    out = window_attention(q, k, v, windows, 1, backend='tiled')
    torch.testing.assert_close(out, dense_window_attention(q, k, v, windows, 1), rtol=1e-5, atol=1e-5)
