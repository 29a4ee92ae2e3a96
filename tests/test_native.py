"""The native C++ kernel equals the dense reference (outputs and gradients), on random windows,
odd grids, per-head windows, 0-5 prefix tokens, head sizes that are and are not multiples of the
vector width, every tile height, fp32/bf16/fp16, strided inputs, the fused-qkv entry,
torch.compile and whole models; on every instruction set this CPU runs (avx512, avx2, generic:
``VITFREE_NATIVE_ISA``), and NaN/Inf outside a query's window never reaches it.  With a position bias
(table, prefix terms, batched or shared rows/cols; never a dense ``full``) the same against a float64
reference, the gradients of every bias part included, and SAM and BEiT WinfTs equal to ``dense``."""
import contextlib
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitfree
from vitfree.ops import dense_window_attention, native, window_attention
from vitfree.ops.native import (native_isa, native_library, native_pair_counts, native_qkv_attention,
                                native_window_attention, window_bounds_tensor)
from vitfree.windows import LayerWindows, WindowSpec, window_areas

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.skipif(native_library()[0] is None, reason=str(native_library()[1]))]

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL_ISAS = ('avx512', 'avx2', 'generic')
ISAS = [i for i in ALL_ISAS if not native._missing(i)]  # what this CPU runs


@contextlib.contextmanager
def _env(**values):
    """Set environment variables (None: unset) for the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _max_tile_rows(isa):
    with _env(VITFREE_NATIVE_ISA=isa):
        return native._kernel().vitfree_window_attention_max_tile_rows()


def _compare(windows, prefix, b=2, heads=2, d=16, seed=0, dtype=torch.float32, threads=1, isa=None, tile_rows=None):
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
        with _env(VITFREE_NATIVE_ISA=isa, VITFREE_NATIVE_TILE_ROWS=tile_rows):
            out = native_window_attention(qn, kn, vn, windows, prefix)
            grads = torch.autograd.grad(out, (qn, kn, vn), grad.to(dtype))
    finally:
        torch.set_num_threads(n)
    assert out.dtype == dtype
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    for name, a, r in zip('qkv', grads, refs):
        torch.testing.assert_close(a.double(), r, **tol, msg=lambda m: f'grad {name}: {m}')


# ---- instruction sets ------------------------------------------------------------------------
@pytest.mark.parametrize('isa', ALL_ISAS)
def test_forced_isa_is_the_one_that_runs(isa):
    if isa not in ISAS:
        pytest.skip(f'this CPU cannot run {isa} (lacks {", ".join(native._missing(isa))})')
    with _env(VITFREE_NATIVE_ISA=isa):
        assert native_isa() == isa
        _compare(LayerWindows(np.random.default_rng(1).integers(0, 4, (2, 9, 11, 4)), (9, 11)), 1, heads=2, d=24)


def test_default_isa_is_the_best_the_cpu_runs():
    with _env(VITFREE_NATIVE_ISA=None):
        assert native_isa() == ISAS[0]


def test_isa_the_cpu_lacks_or_unknown_is_refused(monkeypatch):
    monkeypatch.setattr(native, '_cpu_flags', lambda: {'sse2', 'avx', 'avx2', 'fma', 'bmi1', 'bmi2', 'f16c', 'movbe',
                                                       'abm'})
    monkeypatch.setattr(native.platform, 'machine', lambda: 'x86_64')
    monkeypatch.setattr(native, '_auto_isa', None)
    with _env(VITFREE_NATIVE_ISA='avx512'), pytest.raises(RuntimeError, match='lacks avx512f'):
        native._isa()
    with _env(VITFREE_NATIVE_ISA='sse9'), pytest.raises(ValueError, match="'sse9'.*avx512, avx2, generic"):
        native._isa()
    with _env(VITFREE_NATIVE_ISA=None):
        assert native._isa() == 'avx2'


# ---- the reference, on random windows --------------------------------------------------------
@st.composite
def window_cases(draw):
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 20))
    heads = draw(st.integers(1, 3))
    shape = ((heads,) if draw(st.booleans()) else ()) + (h, w, 4)
    seed = draw(st.integers(0, 2 ** 16))
    ext = np.random.default_rng(seed).integers(0, draw(st.integers(0, 5)) + 1, size=shape)
    isa = draw(st.sampled_from(ISAS))
    return (LayerWindows(ext, (h, w)), heads, draw(st.integers(0, 2)), draw(st.sampled_from([8, 12, 16, 24, 40, 64])),
            seed, isa, draw(st.integers(1, _max_tile_rows(isa))))


@SETTINGS
@given(window_cases())
def test_native_equals_dense_random_windows(case):
    windows, heads, prefix, d, seed, isa, tile_rows = case
    _compare(windows, prefix, heads=heads, d=d, seed=seed, isa=isa, tile_rows=tile_rows)


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('grid', [(7, 9), (13, 5), (1, 17), (17, 1), (1, 1), (14, 14), (5, 33)])
@pytest.mark.parametrize('prefix', [0, 1, 5])
def test_native_odd_grids(grid, prefix, isa):
    rng = np.random.default_rng(sum(grid) + prefix)
    _compare(LayerWindows(rng.integers(0, 4, size=(*grid, 4)), grid), prefix, heads=3, isa=isa)


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('d', [16, 32, 48, 64, 80, 96, 128, 8, 20, 24, 40, 3])  # multiples of 8 / 16 and not
def test_native_head_sizes(d, isa):
    _compare(LayerWindows(np.random.default_rng(d).integers(0, 3, (2, 6, 7, 4)), (6, 7)), 1, heads=2, d=d, isa=isa)


@pytest.mark.parametrize('isa', ISAS)
def test_native_every_tile_height(isa):
    """Tiles of 1..max query rows (and a last tile cut short by the grid) give the same result."""
    windows = LayerWindows(np.random.default_rng(7).integers(0, 4, (3, 8, 19, 4)), (8, 19))
    for rows in range(1, _max_tile_rows(isa) + 1):
        _compare(windows, 2, heads=3, d=24, isa=isa, tile_rows=rows)


@pytest.mark.parametrize('isa', ISAS)
def test_native_many_prefix_tokens(isa):
    """More prefix tokens than a micro-kernel takes at once (they are split into chunks)."""
    windows = LayerWindows(np.random.default_rng(9).integers(0, 3, (2, 5, 18, 4)), (5, 18))
    for prefix in (9, 17):
        _compare(windows, prefix, heads=2, d=20, isa=isa)


@pytest.mark.parametrize('isa', ISAS)
def test_native_large_windows(isa):
    """Windows that reach across most of the grid (many offsets per tile) and the whole grid."""
    _compare(LayerWindows(np.random.default_rng(2).integers(0, 12, (2, 9, 13, 4)), (9, 13)), 1, heads=2, d=16, isa=isa)
    _compare(LayerWindows(20, (6, 11)), 1, heads=1, d=8, isa=isa)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_native_low_precision_runs_in_fp32(dtype):
    _compare(LayerWindows(2, (9, 11)), 1, heads=2, dtype=dtype)


@pytest.mark.parametrize('isa', ISAS)
def test_native_two_threads_same_result(isa):
    windows = LayerWindows(np.random.default_rng(3).integers(0, 4, (12, 10, 4)), (12, 10))
    _compare(windows, 2, b=3, heads=3, d=32, threads=2, isa=isa)


# ---- layouts and the input contract ----------------------------------------------------------
@pytest.mark.parametrize('isa', ISAS)
def test_native_strided_inputs_and_fused_qkv_equal(isa):
    """Views of one qkv projection (no copies) give the generic entry's result, and the fused
    entry's gradient arrives in the projection's own layout."""
    windows = LayerWindows(np.random.default_rng(5).integers(0, 3, (3, 5, 6, 4)), (5, 6))
    b, t, heads, d = 2, 2 + 30, 3, 40
    qkv = torch.randn(b, t, 3, heads, d, dtype=torch.float64)
    q, k, v = (x.clone().requires_grad_() for x in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    qkv32 = qkv.float().requires_grad_()
    ref = dense_window_attention(q, k, v, windows, 2)
    with _env(VITFREE_NATIVE_ISA=isa):
        out = native_qkv_attention(qkv32, windows, 2, d ** -0.5)  # (B, T, H, D)
        g = torch.randn_like(out)
        (dqkv,) = torch.autograd.grad(out, qkv32, g)
        q32, k32, v32 = qkv32.detach().permute(2, 0, 3, 1, 4).unbind(0)  # strided views
        assert q32.stride(-1) == 1 and not q32.is_contiguous()
        torch.testing.assert_close(native_window_attention(q32, k32, v32, windows, 2).double(), ref,
                                   rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, rtol=1e-5, atol=2e-5)
    dref = torch.autograd.grad(ref, (q, k, v), g.transpose(1, 2).double())
    assert dqkv.shape == qkv.shape
    torch.testing.assert_close(dqkv.double(), torch.stack(dref, 0).permute(1, 3, 0, 2, 4), rtol=1e-5, atol=2e-5)


def test_native_non_unit_last_stride_is_handled():
    windows = LayerWindows(2, (4, 5))
    x = torch.randn(3, 1, 2, 21, 16, 2, dtype=torch.float64)
    q, k, v = (x[i, ..., 0] for i in range(3))  # last stride 2
    assert q.stride(-1) == 2
    out = native_window_attention(q.float(), k.float(), v.float(), windows, 1)
    torch.testing.assert_close(out.double(), dense_window_attention(q, k, v, windows, 1), rtol=1e-5, atol=2e-5)


def test_native_refuses_other_v_head_size_and_bad_bounds():
    windows = LayerWindows(1, (3, 3))
    q = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match=r"native kernel needs v's head size \(8\) equal to q's \(16\)"):
        native_window_attention(q, q, torch.randn(1, 2, 10, 8), windows, 1)
    bounds = window_bounds_tensor(windows, 1).clone()
    bounds[0, 4, 1] = 3  # patch 3's window leaves the 3 x 3 grid
    with pytest.raises(ValueError, match='empty or leaves the grid'):
        torch.ops.vitfree.window_attention(q, q, q, bounds, 1, 3, 0.25)


def test_bounds_are_the_clipped_rectangles():
    windows = LayerWindows(np.array([1, 0, 2, 3]), (4, 5))
    b = window_bounds_tensor(windows, 1)
    assert b.shape == (1, 21, 4)
    assert b[0, 0].tolist() == [0, 3, 0, 4]  # the prefix token sees the grid
    assert b[0, 1].tolist() == [0, 0, 0, 3]  # patch (0, 0): rows 0..0, cols 0..3
    assert b[0, 1 + 2 * 5 + 4].tolist() == [1, 2, 2, 4]  # patch (2, 4)


# ---- non-finite values stay inside the windows that hold them ---------------------------------
def _seen_by(bounds, head, token, prefix, grid_w):
    """Queries (token indices) whose window (or prefix) holds key ``token``, for one head."""
    b = bounds[head if bounds.shape[0] > 1 else 0].numpy()
    t = b.shape[0]
    if token < prefix:
        return set(range(t))
    r, c = divmod(token - prefix, grid_w)
    inside = (b[:, 0] <= r) & (r <= b[:, 1]) & (b[:, 2] <= c) & (c <= b[:, 3])
    inside[:prefix] = True
    return set(np.nonzero(inside)[0].tolist())


def _window_of(bounds, head, query, prefix, grid_w):
    b = bounds[head if bounds.shape[0] > 1 else 0, query].tolist()
    if query < prefix:
        return set(range(bounds.shape[1]))
    keys = {prefix + r * grid_w + c for r in range(b[0], b[1] + 1) for c in range(b[2], b[3] + 1)}
    return keys | set(range(prefix))


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('where, value', [('k', float('nan')), ('v', float('inf')), ('v', float('nan')),
                                          ('k', float('-inf')), ('q', float('nan')), ('grad', float('inf'))])
def test_non_finite_values_reach_only_the_windows_that_hold_them(where, value, isa):
    """A NaN/Inf key or value changes only the outputs and gradients of the queries whose window
    holds it (and, through their dS, the gradients of the keys those queries see); a NaN query or
    output gradient only its own row and the keys in its window."""
    grid, prefix, heads, d = (9, 21), 1, 2, 24
    windows = LayerWindows(np.random.default_rng(11).integers(0, 4, (heads, *grid, 4)), grid)
    bounds = window_bounds_tensor(windows, prefix)
    t = prefix + windows.num_patches
    g = torch.Generator().manual_seed(3)
    clean = [torch.randn(1, heads, t, d, generator=g) for _ in range(3)]
    grad = torch.randn(1, heads, t, d, generator=g)
    head, token = 1, prefix + 4 * grid[1] + 17  # patch (4, 17) of head 1
    dirty = [x.clone() for x in clean]
    dgrad = grad.clone()
    target = dgrad if where == 'grad' else dirty['qkv'.index(where)]
    target[0, head, token, 5] = value

    def run(q, k, v, go):
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        with _env(VITFREE_NATIVE_ISA=isa):
            out = native_window_attention(q, k, v, windows, prefix)
            return (out.detach(), *torch.autograd.grad(out, (q, k, v), go))

    ref = run(*clean, grad)
    got = run(*dirty, dgrad)
    if where in 'kv':
        hit_q = _seen_by(bounds, head, token, prefix, grid[1])  # queries that see the bad key
    else:
        hit_q = {token}  # the bad query row itself
    hit_k = set().union(*(_window_of(bounds, head, i, prefix, grid[1]) for i in hit_q)) | {token}
    for name, a, r in zip(('out', 'dq', 'dk', 'dv'), got, ref):
        hit = hit_k if name in ('dk', 'dv') else hit_q
        keep = torch.ones(heads, t, dtype=torch.bool)
        keep[head, sorted(hit)] = False
        torch.testing.assert_close(a[0][keep], r[0][keep], rtol=1e-6, atol=1e-6, msg=lambda m: f'{name}: {m}')
        assert torch.isfinite(a[0][keep]).all(), name
    assert not torch.isfinite(got[1][0, head, sorted(hit_q)]).all()  # the bad value did arrive where it should
    assert len(hit_q) < t // 4  # and the check above covers most queries


# ---- the op in context -----------------------------------------------------------------------
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


# ---- the work the tiles do -------------------------------------------------------------------
@pytest.mark.parametrize('isa', ISAS)
def test_pair_counts(isa):
    """Exact pairs are every query's prefix and window pairs; the tiles compute at least those,
    and for uniform 7 x 7 windows on a 64 x 64 grid, one-row tiles waste under 5 %."""
    rng = np.random.default_rng(4)
    windows = LayerWindows(rng.integers(0, 4, (3, 11, 13, 4)), (11, 13))
    with _env(VITFREE_NATIVE_ISA=isa):
        exact, qk, pv = native_pair_counts(windows, 2, heads=3)
        t = 2 + 11 * 13
        assert exact == int(window_areas(windows.extents, windows.grid).sum()) + 3 * (2 * 11 * 13 + 2 * t)
        assert qk >= exact and pv >= qk
        e, qk1, pv1 = native_pair_counts(LayerWindows(3, (64, 64)), 1, heads=6, tile_rows=1)
        assert qk1 == pv1 and 0.95 < e / qk1 <= 1.0
        with pytest.raises(ValueError, match='heads=4'):
            native_pair_counts(windows, 2, heads=4)


# ---- the position bias (issue 23, item 2) -----------------------------------------------------
BIAS_KINDS = ['table', 'small', 'prefix', 'table+prefix', 'rows+cols', 'rows+cols/1', 'rows', 'cols/1',
              'table+prefix+rows+cols']


def _bias_parts(kind, b, heads, grid, seed):
    """Random bias parts, float64: ``table`` (sized for the grid), ``small`` (a 3 x 5 table: offsets past it
    take its edge), ``prefix``, ``rows`` / ``cols`` batched (``/1``: shared by the batch)."""
    g = torch.Generator().manual_seed(seed + 17)
    n = grid[0] * grid[1]
    batch = 1 if kind.endswith('/1') else b
    parts = {}
    if 'table' in kind:
        parts['table'] = torch.randn(heads, 2 * grid[0] - 1, 2 * grid[1] - 1, generator=g, dtype=torch.float64)
    if 'small' in kind:
        parts['table'] = torch.randn(heads, 3, 5, generator=g, dtype=torch.float64)
    if 'prefix' in kind:
        parts['prefix'] = torch.randn(heads, 3, generator=g, dtype=torch.float64)
    if 'rows' in kind:
        parts['rows'] = torch.randn(batch, heads, n, grid[0], generator=g, dtype=torch.float64)
    if 'cols' in kind:
        parts['cols'] = torch.randn(batch, heads, n, grid[1], generator=g, dtype=torch.float64)
    return parts


def _bias_reference(q, k, v, windows, prefix, parts):
    """float64 attention over each query's allowed keys, the bias (:func:`dense_position_bias`) added to those
    logits only."""
    from vitfree.ops.bias import dense_position_bias, position_bias
    allowed = windows.mask(prefix)
    allowed = allowed if allowed.dim() == 3 else allowed.unsqueeze(0)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    logits = logits + dense_position_bias(position_bias(**parts), windows.grid, prefix, logits)
    return logits.masked_fill(~allowed, float('-inf')).softmax(-1) @ v


def _compare_bias(windows, prefix, kind, b=2, heads=2, d=16, seed=0, isa=None, tile_rows=None, threads=1):
    """native (fp32) with a bias against the float64 reference: outputs and the gradients of q, k, v and every
    bias part."""
    from vitfree.ops.bias import position_bias
    g = torch.Generator().manual_seed(seed)
    t = prefix + windows.num_patches
    qkv = [torch.randn(b, heads, t, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    parts = {n: p.requires_grad_() for n, p in _bias_parts(kind, b, heads, windows.grid, seed).items()}
    ref = _bias_reference(*qkv, windows, prefix, parts)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    refs = torch.autograd.grad(ref, qkv + list(parts.values()), grad, allow_unused=True)
    leaves = [x.detach().float().requires_grad_() for x in qkv + list(parts.values())]
    bias = position_bias(**dict(zip(parts, leaves[3:])))
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _env(VITFREE_NATIVE_ISA=isa, VITFREE_NATIVE_TILE_ROWS=tile_rows):
            out = window_attention(*leaves[:3], windows, prefix, backend='native', bias=bias)
            grads = torch.autograd.grad(out, leaves, grad.float())
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for name, a, r, x in zip(['q', 'k', 'v', *parts], grads, refs, leaves):
        r = torch.zeros_like(x, dtype=torch.float64) if r is None else r  # a prefix term without prefix tokens
        assert a.shape == x.shape, name
        scale = max(r.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f'grad {name}: {m}')


def _random_windows(grid, heads, per_head, seed, most=3):
    shape = ((heads,) if per_head else ()) + (*grid, 4)
    return LayerWindows(np.random.default_rng(seed).integers(0, most + 1, size=shape), grid)


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('kind', BIAS_KINDS)
@pytest.mark.parametrize('grid,prefix,per_head', [((5, 7), 0, False), ((9, 11), 1, True), ((5, 7), 3, True)])
def test_native_bias_matches_reference(grid, prefix, per_head, kind, isa):
    windows = _random_windows(grid, 3, per_head, seed=sum(grid) + prefix)
    _compare_bias(windows, prefix, kind, b=2, heads=3, d=24, seed=len(kind) + prefix, isa=isa)


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('grid', [(1, 1), (1, 17), (17, 1), (3, 20), (14, 14)])
def test_native_bias_odd_and_wide_grids(grid, isa):
    """Grids narrower than a tile, wider than one vector, one patch; windows up to the whole grid."""
    windows = _random_windows(grid, 2, True, seed=grid[1], most=9)
    _compare_bias(windows, 1, 'table+prefix+rows+cols', heads=2, d=8, seed=grid[0], isa=isa)


@pytest.mark.parametrize('isa', ISAS)
def test_native_bias_every_tile_height_and_two_threads(isa):
    windows = _random_windows((8, 19), 3, True, seed=7)
    for rows in range(1, _max_tile_rows(isa) + 1):
        _compare_bias(windows, 2, 'small+prefix+rows+cols/1', heads=3, d=24, isa=isa, tile_rows=rows)
    _compare_bias(windows, 1, 'table+prefix+rows+cols', b=3, heads=3, d=32, isa=isa, threads=2)


@st.composite
def bias_cases(draw):
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 20))
    heads = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 16))
    windows = _random_windows((h, w), heads, draw(st.booleans()), seed, most=draw(st.integers(0, 5)))
    isa = draw(st.sampled_from(ISAS))
    kind = '+'.join(draw(st.lists(st.sampled_from(['table', 'small', 'prefix', 'rows', 'cols', 'rows/1']),
                                  min_size=1, max_size=4, unique=True)))
    kind = kind.replace('rows/1', 'rows') + '/1' if 'rows/1' in kind else kind  # '/1': rows and cols shared
    return (windows, heads, draw(st.integers(0, 2)), kind, draw(st.integers(1, 2)),
            draw(st.sampled_from([8, 12, 16, 40])), seed, isa, draw(st.integers(1, _max_tile_rows(isa))))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bias_cases())
def test_native_bias_property(case):
    windows, heads, prefix, kind, b, d, seed, isa, tile_rows = case
    _compare_bias(windows, prefix, kind, b=b, heads=heads, d=d, seed=seed, isa=isa, tile_rows=tile_rows)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_native_bias_low_precision(dtype):
    """bf16/fp16 inputs and bias parts: logits, bias and softmax in fp32; the parts' gradients come back in
    their own dtype."""
    from vitfree.ops.bias import position_bias
    windows = _random_windows((5, 7), 2, True, seed=5)
    g = torch.Generator().manual_seed(2)
    qkv = [torch.randn(2, 2, 36, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    parts = _bias_parts('table+prefix+rows+cols/1', 2, 2, (5, 7), 1)
    low = [x.to(dtype).requires_grad_() for x in qkv + list(parts.values())]
    out = window_attention(*low[:3], windows, 1, backend='native', bias=position_bias(**dict(zip(parts, low[3:]))))
    grads = torch.autograd.grad(out.float().sum(), low)
    wide = [x.detach().double().requires_grad_() for x in low]
    ref = _bias_reference(*wide[:3], windows, 1, dict(zip(parts, wide[3:])))
    refs = torch.autograd.grad(ref.sum(), wide)
    assert out.dtype == dtype and all(a.dtype == dtype for a in grads)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=3e-2)
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a.double(), r, rtol=2e-2, atol=3e-2 * max(r.abs().max().item(), 1.0))


def test_native_refuses_a_dense_full_bias_and_auto_goes_elsewhere():
    """``full`` (any dense T x T bias) is not taken by native: naming native is one clear error, auto picks a
    backend that adds it; without ``full`` auto may pick native at high resolution."""
    from vitfree.ops import BackendError, choose_backend, make_query, plan
    from vitfree.ops.bias import position_bias
    windows = LayerWindows(1, (3, 4))
    q, k, v = (torch.randn(1, 2, 13, 8) for _ in range(3))
    full = position_bias(table=torch.randn(2, 3, 3), full=torch.randn(1, 1, 13, 13))
    with pytest.raises(BackendError, match=r"'native' cannot run .*position bias \(table, full\): native cannot add "
                                           r"the full part .*takes table, prefix, rows, cols.*backends that can: "
                                           r"\[.*'dense'"):
        window_attention(q, k, v, windows, 1, backend='native', bias=full)
    parts = dict(table=full.table, full=full.full)
    out = window_attention(q, k, v, windows, 1, bias=full)
    torch.testing.assert_close(out.double(), _bias_reference(q.double(), k.double(), v.double(), windows, 1,
                                                             {n: p.double() for n, p in parts.items()}),
                               rtol=1e-5, atol=1e-5)
    big = torch.empty(1, 6, 1 + 64 * 64, 64)
    wide = LayerWindows(3, (64, 64))
    for bias in (position_bias(table=torch.zeros(6, 7, 7), prefix=torch.zeros(6, 3)),
                 position_bias(rows=torch.zeros(1, 6, 4096, 64), cols=torch.zeros(1, 6, 4096, 64))):
        assert plan(wide, make_query(big, wide.grid, 1, 6, 64, bias=bias)).name == 'native'
    assert plan(wide, make_query(big, wide.grid, 1, 6, 64, bias=full)).name != 'native'
    assert choose_backend(big, wide, 1) == 'native'


@pytest.mark.parametrize('isa', ISAS)
def test_native_bias_keeps_non_finite_keys_in_their_windows(isa):
    """A NaN key changes only the rows that see it, with a bias as without."""
    from vitfree.ops.bias import position_bias
    windows = _random_windows((6, 9), 2, True, seed=4, most=2)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 1 + 54, 8, generator=g) for _ in range(3))
    parts = {n: p.float() for n, p in _bias_parts('table+prefix+rows+cols', 1, 2, (6, 9), 2).items()}
    token = 1 + 2 * 9 + 4
    dirty = k.clone()
    dirty[0, 1, token, 3] = float('nan')
    with _env(VITFREE_NATIVE_ISA=isa):
        clean = window_attention(q, k, v, windows, 1, backend='native', bias=position_bias(**parts))
        got = window_attention(q, dirty, v, windows, 1, backend='native', bias=position_bias(**parts))
    sees = windows.mask(1)[1][:, token]  # the rows of head 1 that see the key
    torch.testing.assert_close(got[0, 0], clean[0, 0])
    torch.testing.assert_close(got[0, 1][~sees], clean[0, 1][~sees])
    assert not torch.isfinite(got[0, 1][sees]).all() and 1 < sees.sum() < 20


def test_native_bias_compiles():
    """Inside torch.compile the biased kernel is one opaque op (forward and backward), same numbers."""
    from vitfree.ops.bias import position_bias
    windows = _random_windows((5, 7), 2, True, seed=3)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 36, 16, generator=g).requires_grad_() for _ in range(3))
    parts = {n: p.float().requires_grad_() for n, p in _bias_parts('table+prefix+rows+cols/1', 2, 2, (5, 7), 0).items()}

    def f(q, k, v, table, prefix, rows, cols):
        bias = position_bias(table=table, prefix=prefix, rows=rows, cols=cols)
        return window_attention(q, k, v, windows, 1, backend='native', bias=bias)

    leaves = [q, k, v, *parts.values()]
    want = f(*leaves)
    dwant = torch.autograd.grad(want.square().sum(), leaves)
    got = torch.compile(f, fullgraph=True, backend='aot_eager')(*leaves)
    dgot = torch.autograd.grad(got.square().sum(), leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(dgot, dwant):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', ['sam', 'beit'])
def test_bias_families_on_native_equal_dense(name):
    """A SAM WinfT (decomposed rel-pos: rows and cols that depend on q) and a BEiT WinfT (relative table and
    class-token terms) with random per-head windows: native gives dense's output and gradients (input and every
    parameter, the position tables included)."""
    from families import images, random_spec, winft_of
    m = winft_of(name, windows=random_spec(name, global_blocks=(1,) if name == 'sam' else ()))
    x = images(name)
    res = {}
    for backend in ('native', 'dense'):
        m.zero_grad()
        m.set_attn_backend(backend)
        xb = x.clone().requires_grad_()
        out = m(xb)
        out.backward(torch.ones_like(out) + out.detach())
        assert set(m.attn_backends()) == {backend} | ({'global'} if name == 'sam' else set())
        res[backend] = (out.detach(), xb.grad, {n: p.grad for n, p in m.named_parameters()})
    (out, dx, grads), (ref, ref_dx, ref_grads) = res['native'], res['dense']
    for what, a, r in [('output', out, ref), ('input gradient', dx, ref_dx)] + [
            (f'gradient of {n}', g, ref_grads[n]) for n, g in grads.items() if ref_grads[n] is not None]:
        scale = max(r.abs().max().item(), 1e-3)
        assert (a - r).abs().max().item() <= 1e-4 * scale, what
    tables = [n for n in grads if 'rel_pos' in n or 'relative_position' in n]
    assert tables and all(grads[n].abs().sum() > 0 for n in tables)
