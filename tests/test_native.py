"""The native C++ kernel equals the dense reference (outputs and gradients), on random windows,
odd grids, per-head windows, 0/1/5 prefix tokens, every head size it specialises and others,
fp32/bf16/fp16, strided inputs, the fused-qkv entry, torch.compile and whole models."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitfree
from vitfree.ops import dense_window_attention, window_attention
from vitfree.ops.native import native_library, native_qkv_attention, native_window_attention, window_bounds_tensor
from vitfree.windows import LayerWindows, WindowSpec

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.skipif(native_library()[0] is None, reason=str(native_library()[1]))]

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _compare(windows, prefix, b=2, heads=2, d=16, seed=0, dtype=torch.float32, threads=1):
    g = torch.Generator().manual_seed(seed)
    t = prefix + windows.num_patches
    q, k, v = (torch.randn(b, heads, t, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    ref = dense_window_attention(q, k, v, windows, prefix)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    refs = torch.autograd.grad(ref, (q, k, v), grad)
    qn, kn, vn = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = native_window_attention(qn, kn, vn, windows, prefix)
        grads = torch.autograd.grad(out, (qn, kn, vn), grad.to(dtype))
    finally:
        torch.set_num_threads(n)
    assert out.dtype == dtype
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    for name, a, r in zip('qkv', grads, refs):
        torch.testing.assert_close(a.double(), r, **tol, msg=lambda m: f'grad {name}: {m}')


@st.composite
def window_cases(draw):
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    heads = draw(st.integers(1, 3))
    shape = ((heads,) if draw(st.booleans()) else ()) + (h, w, 4)
    seed = draw(st.integers(0, 2 ** 16))
    ext = np.random.default_rng(seed).integers(0, draw(st.integers(0, 5)) + 1, size=shape)
    return LayerWindows(ext, (h, w)), heads, draw(st.sampled_from([0, 1, 5])), draw(st.sampled_from([8, 16, 24, 64])), seed


@SETTINGS
@given(window_cases())
def test_native_equals_dense_random_windows(case):
    windows, heads, prefix, d, seed = case
    _compare(windows, prefix, heads=heads, d=d, seed=seed)


@pytest.mark.parametrize('grid', [(7, 9), (13, 5), (1, 17), (17, 1), (1, 1), (14, 14)])
@pytest.mark.parametrize('prefix', [0, 1, 5])
def test_native_odd_grids(grid, prefix):
    rng = np.random.default_rng(sum(grid) + prefix)
    _compare(LayerWindows(rng.integers(0, 4, size=(*grid, 4)), grid), prefix, heads=3)


@pytest.mark.parametrize('d', [16, 32, 48, 64, 80, 96, 128, 20])  # specialised sizes and the generic loop
def test_native_head_sizes(d):
    _compare(LayerWindows(np.random.default_rng(d).integers(0, 3, (2, 6, 7, 4)), (6, 7)), 1, heads=2, d=d)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_native_low_precision_runs_in_fp32(dtype):
    _compare(LayerWindows(2, (9, 11)), 1, heads=2, dtype=dtype)


def test_native_two_threads_same_result():
    windows = LayerWindows(np.random.default_rng(3).integers(0, 4, (12, 10, 4)), (12, 10))
    _compare(windows, 2, b=3, heads=3, d=32, threads=2)


def test_native_strided_inputs_and_fused_qkv_equal():
    """Views of one qkv projection (no copies) give the generic entry's result, and the fused
    entry's gradient arrives in the projection's own layout."""
    windows = LayerWindows(np.random.default_rng(5).integers(0, 3, (3, 5, 6, 4)), (5, 6))
    b, t, heads, d = 2, 2 + 30, 3, 16
    qkv = torch.randn(b, t, 3, heads, d, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ref = dense_window_attention(q, k, v, windows, 2)
    out = native_qkv_attention(qkv, windows, 2, d ** -0.5)  # (B, T, H, D)
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    (dref,) = torch.autograd.grad(ref, qkv, g.transpose(1, 2))
    assert dqkv.shape == qkv.shape
    torch.testing.assert_close(dqkv, dref, rtol=1e-5, atol=1e-5)


def test_bounds_are_the_clipped_rectangles():
    windows = LayerWindows(np.array([1, 0, 2, 3]), (4, 5))
    b = window_bounds_tensor(windows, 1)
    assert b.shape == (1, 21, 4)
    assert b[0, 0].tolist() == [0, 3, 0, 4]  # the prefix token sees the grid
    assert b[0, 1].tolist() == [0, 0, 0, 3]  # patch (0, 0): rows 0..0, cols 0..3
    assert b[0, 1 + 2 * 5 + 4].tolist() == [1, 2, 2, 4]  # patch (2, 4)


def test_dropout_is_never_given_to_native():
    """The kernel has no attention dropout: auto never picks it for a call with dropout, and naming it
    is a clear error that lists what can run it."""
    from vitfree.ops import BackendError, choose_backend, make_query, plan
    windows = LayerWindows(2, (5, 5))
    q, k, v = (torch.randn(1, 2, 26, 8) for _ in range(3))
    query = make_query(q, windows.grid, 1, 2, 8, dropout=True)
    assert plan(windows, query).name != 'native'
    with pytest.raises(BackendError, match=r"'native' cannot run .*has no attention dropout.*backends that can"):
        native_window_attention(q, k, v, windows, 1, dropout_p=0.5)
    out = window_attention(q, k, v, windows, 1, dropout_p=0.5)
    assert out.shape == q.shape and choose_backend(q, windows, 1) in ('native', 'dense', 'tiled')


def test_model_on_native_equals_dense_and_compiles():
    spec = WindowSpec.uniform(4, (6, 7), 2, global_blocks=[3])
    m = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, img_size=(96, 112), depth=4, embed_dim=64,
                             num_heads=4, attn_backend='native').eval()
    x = torch.randn(2, 3, 96, 112)
    out = m(x)
    assert m.attn_backends() == ['native'] * 3 + ['global']
    with vitfree.use_backend('dense'):
        ref = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    c = torch.compile(m, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(c(x), ref, rtol=1e-5, atol=1e-5)
    m.train()
    loss = c(x).square().mean()
    loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    with vitfree.use_backend('dense'):
        m(x).square().mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda s: f'{n}: {s}')


def test_auto_picks_native_at_high_resolution():
    from vitfree.ops import choose_backend
    q = torch.empty(1, 6, 1 + 64 * 64, 64)
    assert choose_backend(q, LayerWindows(3, (64, 64)), 1) == 'native'
