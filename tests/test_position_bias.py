"""The position bias inside the windows (METHODS §1.7): every backend that takes one (``dense``,
``eager``, ``tiled``, ``global``) against a float64 reference that adds the bias to the allowed
logits only, outputs and the gradients of q, k, v and every bias part; per-head windows, odd grids,
prefix tokens, batched and broadcast parts; the dispatcher never gives a bias to a backend that
cannot add it (or a part it cannot add).  The native kernel's bias is tested in ``test_native.py``."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitfree.ops import BackendError, window_attention
from vitfree.ops.bias import dense_position_bias, position_bias
from vitfree.windows import LayerWindows

pytestmark = pytest.mark.usefixtures('one_thread')

BIAS_BACKENDS = ['dense', 'eager', 'tiled']


def reference(q, k, v, windows, prefix, bias):
    """float64 attention summing over each query's allowed keys, the bias added to those logits."""
    q, k, v = q.double(), k.double(), v.double()
    allowed = windows.mask(prefix)
    allowed = allowed if allowed.dim() == 3 else allowed.unsqueeze(0)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    logits = logits + dense_position_bias(bias, windows.grid, prefix, logits)
    return logits.masked_fill(~allowed, float('-inf')).softmax(-1) @ v


def _bias(kind, b, h, grid, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    parts = {}
    if 'table' in kind:
        parts['table'] = torch.randn(h, 2 * grid[0] - 1, 2 * grid[1] - 1, generator=g, dtype=dtype)
    if 'small' in kind:  # a table smaller than the grid: offsets beyond it take its edge
        parts['table'] = torch.randn(h, 3, 5, generator=g, dtype=dtype)
    if 'prefix' in kind:
        parts['prefix'] = torch.randn(h, 3, generator=g, dtype=dtype)
    if 'decomposed' in kind:
        parts['rows'] = torch.randn(b, h, n, grid[0], generator=g, dtype=dtype)
        parts['cols'] = torch.randn(1, h, n, grid[1], generator=g, dtype=dtype)
    return {k: v.requires_grad_() for k, v in parts.items()}


def _full(parts, b, h, t, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 1)
    parts['full'] = torch.randn(b, 1, t, t, generator=g, dtype=dtype).requires_grad_()
    return parts


def _run(name, q, k, v, w, prefix, parts):
    leaves = [q, k, v] + list(parts.values())
    out = window_attention(q, k, v, w, prefix, backend=name, bias=position_bias(**parts))
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out) + out.detach(), allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _compare(name, b, h, grid, prefix, kind, per_head, seed, full=False):
    rng = np.random.default_rng(seed)
    shape = ((h,) if per_head else ()) + (*grid, 4)
    w = LayerWindows(rng.integers(0, 3, size=shape), grid)
    t = prefix + grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, 8, generator=g).requires_grad_() for _ in range(3))
    parts = _bias(kind, b, h, grid, seed)
    if full:
        parts = _full(parts, b, h, t, seed)
    out, grads = _run(name, q, k, v, w, prefix, parts)
    ref_parts = {key: p.detach().double().requires_grad_() for key, p in parts.items()}
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(qd, kd, vd, w, prefix, position_bias(**ref_parts))
    ref_leaves = [qd, kd, vd] + list(ref_parts.values())
    ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref) + ref.detach(), allow_unused=True)
    ref_grads = [torch.zeros_like(x) if g is None else g for g, x in zip(ref_grads, ref_leaves)]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want, label in zip(grads, ref_grads, ['q', 'k', 'v'] + list(parts)):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * scale, msg=lambda m: f'd{label}: {m}')


@pytest.mark.parametrize('name', BIAS_BACKENDS)
@pytest.mark.parametrize('kind,prefix', [('table+prefix', 1), ('small', 0), ('decomposed', 0),
                                          ('decomposed+table+prefix', 2)])
@pytest.mark.parametrize('per_head', [False, True])
def test_bias_matches_reference(name, kind, prefix, per_head):
    _compare(name, 2, 3, (5, 7), prefix, kind, per_head, seed=len(kind) + prefix)


@pytest.mark.parametrize('name', BIAS_BACKENDS)
def test_dense_full_bias_part(name):
    _compare(name, 2, 2, (3, 5), 1, 'prefix', False, seed=3, full=True)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(BIAS_BACKENDS), h=st.integers(1, 5), w=st.integers(1, 6), prefix=st.integers(0, 2),
       kind=st.sampled_from(['table', 'decomposed', 'table+prefix+decomposed', 'small+prefix']),
       per_head=st.booleans(), seed=st.integers(0, 1000))
def test_bias_property(name, h, w, prefix, kind, per_head, seed):
    _compare(name, 1 + seed % 2, 2, (h, w), prefix, kind, per_head, seed)


def test_tiled_bias_with_many_chunks(monkeypatch):
    """Chunked batches and heads accumulate the bias's gradient over the chunks."""
    import vitfree.ops.tiled as tiled
    monkeypatch.setattr(tiled, '_CHUNK_ELEMS', 64)
    _compare('tiled', 3, 3, (6, 5), 1, 'decomposed+table+prefix', True, seed=7)


def test_global_backend_adds_the_bias():
    w = LayerWindows(np.full((4, 3, 4), 9), (4, 3))  # every window covers the grid
    t = 1 + 12
    q, k, v = (torch.randn(2, 2, t, 4) for _ in range(3))
    parts = _bias('table+prefix+decomposed', 2, 2, (4, 3), 5)
    b = position_bias(**parts)
    out = window_attention(q, k, v, w, 1, backend='global', bias=b)
    torch.testing.assert_close(out.double(), reference(q, k, v, w, 1, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name,full,why', [('sdpa-tiles', False, 'a position bias'),
                                           ('native', True, 'the full part of a position bias')])
def test_backends_without_bias_refuse_it(name, full, why):
    """A backend that takes no bias, or not every part of this one (native: no dense ``full``), is never
    given it."""
    w = LayerWindows(np.ones((3, 3, 4), dtype=int), (3, 3))
    q = k = v = torch.randn(1, 2, 10, 4)
    b = position_bias(table=torch.zeros(2, 5, 5), full=torch.zeros(1, 1, 10, 10) if full else None)
    with pytest.raises(BackendError, match=rf"{name} cannot add {why}.*backends that can: \[.*'dense'"):
        window_attention(q, k, v, w, 1, backend=name, bias=b)
    out = window_attention(q, k, v, w, 1, bias=b)  # auto picks one that can
    torch.testing.assert_close(out.double(), reference(q, k, v, w, 1, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('part,shape,match', [
    ('table', (2, 4, 5), r'bias.table must be a floating tensor of shape \(heads=2, 2\*ry\+1, 2\*rx\+1\)'),
    ('rows', (1, 2, 9, 4), r'bias.rows must be a floating tensor of shape \(1 or 1, 2, 9, 3\), got \(1, 2, 9, 4\)'),
    ('prefix', (3, 3), r'bias.prefix must be .* \(2, 3\), got \(3, 3\)'),
])
def test_bad_bias_shapes_are_named(part, shape, match):
    w = LayerWindows(np.ones((3, 3, 4), dtype=int), (3, 3))
    q = k = v = torch.randn(1, 2, 10, 4)
    with pytest.raises(BackendError, match=match):
        window_attention(q, k, v, w, 1, bias=position_bias(**{part: torch.zeros(shape)}))
    with pytest.raises(BackendError, match=r'must be a vitfree.ops.bias.PositionBias \(position_bias\(...\)\), got tuple'):
        window_attention(q, k, v, w, 1, bias=(torch.zeros(1),))


def test_dense_materialisation_by_hand():
    """Every pair's term written out from the definitions (METHODS §1.7), against the dense materialisation."""
    h, w, p, heads = 3, 4, 2, 2
    g = torch.Generator().manual_seed(0)
    table, pre = torch.randn(heads, 3, 5, generator=g), torch.randn(heads, 3, generator=g)
    rows, cols = torch.randn(1, heads, h * w, h, generator=g), torch.randn(1, heads, h * w, w, generator=g)
    got = dense_position_bias(position_bias(table=table, prefix=pre, rows=rows, cols=cols), (h, w), p,
                              torch.empty(0))[0]
    t = p + h * w
    want = torch.zeros(heads, t, t)
    for i in range(t):
        for j in range(t):
            if i < p and j < p:
                want[:, i, j] = pre[:, 2]
            elif i < p:
                want[:, i, j] = pre[:, 0]
            elif j < p:
                want[:, i, j] = pre[:, 1]
            else:
                (yi, xi), (yj, xj) = divmod(i - p, w), divmod(j - p, w)
                dy, dx = max(-1, min(1, yi - yj)) + 1, max(-2, min(2, xi - xj)) + 2
                want[:, i, j] = table[:, dy, dx] + rows[0, :, i - p, yj] + cols[0, :, i - p, xj]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize('name', BIAS_BACKENDS)
def test_nonfinite_keys_stay_in_the_rows_that_see_them_with_a_bias(name):
    w = LayerWindows(np.random.default_rng(2).integers(0, 2, size=(4, 5, 4)), (4, 5))
    q, k, v = (torch.randn(1, 2, 21, 8) for _ in range(3))
    k[0, 1, 7] = float('nan')
    v[0, 0, 12] = float('inf')
    b = position_bias(**_bias('table+prefix+decomposed', 1, 2, (4, 5), 3))
    out = window_attention(q, k, v, w, 1, backend=name, bias=b)
    ref = reference(q.double(), k.double().nan_to_num(0, 0, 0), v.double().nan_to_num(0, 0, 0), w, 1, b)
    sees = w.mask(1)  # (T, T): query rows, key columns
    clean = torch.ones(1, 2, 21, dtype=torch.bool)
    clean[0, 1] &= ~sees[:, 7]  # rows of head 1 that cannot see the NaN key
    clean[0, 0] &= ~sees[:, 12]  # rows of head 0 that cannot see the Inf value
    assert clean.sum() > 10 and not clean.all()
    torch.testing.assert_close(out.double()[clean], ref[clean], rtol=1e-5, atol=1e-5)
    assert not torch.isfinite(out[0, 1][~clean[0, 1]]).all()  # the NaN key reaches the rows that see it
