"""The input contract of every backend, checked once in the dispatcher, and no silent wrong answers:
v's own head size, strides, dtypes, dropout, zero sizes; NaN and Inf kept to the rows that can see
them; ``torch.func`` and double backward; resizing always from the spec the model was given; and a
property test that drives random specs, dtypes, autograd modes and call orders through every CPU
backend against a float64 reference that sums over allowed keys only."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitfree
from vitfree import WindowSpec
from vitfree.ops import BackendError, window_attention
from vitfree.windows import LayerWindows

pytestmark = pytest.mark.usefixtures('one_thread')

CPU = ['dense', 'tiled', 'native', 'eager', 'sdpa-tiles']


def reference(q, k, v, windows, prefix, scale=None, attn_mask=None):
    """float64 attention that sums over each query's allowed keys only (a masked key or value never
    meets an arithmetic operation)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = windows.mask(prefix)
    allowed = allowed if allowed.dim() == 3 else allowed.unsqueeze(0)
    allowed = allowed.unsqueeze(0).expand(q.shape[0], q.shape[1], -1, -1)
    if attn_mask is not None:
        allowed = allowed & attn_mask
    pairs = (q.unsqueeze(-2) * k.unsqueeze(-3).where(allowed.unsqueeze(-1), 0)).sum(-1) * scale
    probs = pairs.masked_fill(~allowed, float('-inf')).softmax(-1)
    return (probs.unsqueeze(-1) * v.unsqueeze(-3).where(allowed.unsqueeze(-1), 0)).sum(-2)


def _windows(grid=(5, 7), per_head=False, heads=2, hi=2, seed=0):
    shape = ((heads,) if per_head else ()) + (*grid, 4)
    return LayerWindows(np.random.default_rng(seed).integers(0, hi + 1, size=shape), grid)


def _qkv(b, h, t, d, dv=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g, dtype=dtype), torch.randn(b, h, t, d, generator=g, dtype=dtype),
            torch.randn(b, h, t, dv or d, generator=g, dtype=dtype))


def _close(out, ref, eps):
    tol = 64 * eps * max(ref.abs().max().item(), 1e-30)
    assert (out.double() - ref).abs().max().item() <= tol


# ---- shapes, strides, dtypes, dropout ----------------------------------------------------------------------
def test_v_may_have_its_own_head_size():
    w = _windows()
    q, k, v = _qkv(2, 2, 1 + 35, 8, dv=12)
    ref = reference(q, k, v, w, 1)
    for name in ('dense', 'tiled', 'eager', 'sdpa-tiles'):
        out = window_attention(q, k, v, w, 1, backend=name)
        assert out.shape == (2, 2, 36, 12)
        _close(out, ref, torch.finfo(torch.float32).eps)
    _close(window_attention(q, k, v, w, 1), ref, torch.finfo(torch.float32).eps)  # auto never picks native here
    with pytest.raises(BackendError, match=r"native.*v's head size \(12\) equal to q's \(8\)"):
        window_attention(q, k, v, w, 1, backend='native')


def test_strided_inputs_are_handled():
    w = _windows()
    base = torch.randn(2, 2, 8, 36)
    q = base.transpose(-1, -2)  # unit stride along tokens, not channels
    _, k, v = _qkv(2, 2, 36, 8)
    ref = reference(q, k, v, w, 1)
    for name in CPU:
        _close(window_attention(q, k, v, w, 1, backend=name), ref, torch.finfo(torch.float32).eps)


@pytest.mark.parametrize('bad,match', [
    (dict(dropout_p=1.5), r'dropout_p must be a number in \[0, 1\), got 1.5'),
    (dict(dropout_p=-0.1), r'dropout_p must be a number in \[0, 1\), got -0.1'),
    (dict(dropout_p=True), r'dropout_p must be a number'),
    (dict(num_prefix_tokens=-1), r'num_prefix_tokens must be an int >= 0, got -1'),
])
def test_bad_values_are_named(bad, match):
    w = _windows()
    q, k, v = _qkv(1, 2, 36, 8)
    kwargs = dict(dict(num_prefix_tokens=1), **bad)
    with pytest.raises(BackendError, match=match):
        window_attention(q, k, v, w, **kwargs)


def test_bad_tensors_are_named():
    w = _windows()
    q, k, v = _qkv(1, 2, 36, 8)
    with pytest.raises(BackendError, match=r'q must be floating point .* got torch.int32'):
        window_attention(q.int(), k.int(), v.int(), w, 1)
    with pytest.raises(BackendError, match=r'must share one dtype .*float32, torch.float16'):
        window_attention(q, k.half(), v, w, 1)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast decides the dtype: mixed inputs are fine
        out = window_attention(q, k.half(), v, w, 1)
    assert out.dtype == torch.bfloat16
    with pytest.raises(BackendError, match='at least one head'):
        window_attention(q[:, :0], k[:, :0], v[:, :0], w, 1)
    with pytest.raises(BackendError, match=r'sequence length 35 does not match 1 prefix tokens \+ 5x7'):
        window_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], w, 1)
    empty = window_attention(q[:0], k[:0], v[:0], w, 1)  # an empty batch is a valid, empty result
    assert empty.shape == (0, 2, 36, 8)


# ---- non-finite values -------------------------------------------------------------------------------------
@pytest.mark.parametrize('per_head', [False, True])
@pytest.mark.parametrize('name', CPU + ['flex'])
def test_nan_and_inf_stay_in_the_rows_that_see_them(name, per_head):
    w = _windows((6, 7), per_head, hi=1, seed=3)
    q, k, v = _qkv(2, 2, 1 + 42, 8, seed=4)
    k[0, 1, 20, 3] = float('nan')  # a patch key
    v[1, 0, 33, 5] = float('inf')  # a patch value
    grad = name != 'flex'  # FlexAttention has no backward pass on CPU
    q.requires_grad_(grad)
    out = window_attention(q, k, v, w, 1, backend=name)
    ref = reference(q.detach(), k, v, w, 1)
    allowed = w.mask(1)
    allowed = (allowed if allowed.dim() == 3 else allowed.unsqueeze(0)).expand(2, -1, -1)  # (heads, T, T)
    sees = torch.zeros(2, 2, 43, dtype=torch.bool)
    sees[0, 1] = allowed[1, :, 20]
    sees[1, 0] = allowed[0, :, 33]
    # rows that cannot see a bad token: finite and equal to the reference
    assert torch.isfinite(out[~sees]).all()
    _close(out[~sees], ref[~sees], torch.finfo(torch.float32).eps)
    # rows that can: exactly what the reference computes (NaN, Inf or a number)
    torch.testing.assert_close(out[sees].double(), ref[sees], rtol=1e-4, atol=1e-5, equal_nan=True)
    assert not torch.isfinite(out[sees]).all()
    if grad:
        (dq,) = torch.autograd.grad(out.nan_to_num(0, 0, 0).sum(), q)
        assert torch.isfinite(dq[~sees]).all()  # no NaN reaches a query that cannot see one


# ---- torch.func and double backward ------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['native', 'tiled', 'dense', 'eager'])
def test_torch_func_grad_works(name):
    from torch.func import grad
    w = _windows()
    q, k, v = _qkv(1, 2, 36, 8)
    g = grad(lambda q_: window_attention(q_, k, v, w, 1, backend=name).square().sum())(q)
    qq = q.clone().requires_grad_()
    (ref,) = torch.autograd.grad(reference(qq, k, v, w, 1).square().sum(), qq)
    _close(g, ref, torch.finfo(torch.float32).eps * 16)


@pytest.mark.parametrize('name', ['native', 'tiled'])
def test_double_backward_is_one_clear_error(name):
    w = _windows()
    q, k, v = _qkv(1, 2, 36, 8)
    q.requires_grad_()
    out = window_attention(q, k, v, w, 1, backend=name)
    with pytest.raises(RuntimeError, match=r"no second derivative .*use_backend\('eager'\)"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)


def test_double_backward_on_eager_and_torch_func_hessian_vector():
    from torch.func import grad
    w = _windows()
    q, k, v = _qkv(1, 2, 36, 8, dtype=torch.float64)
    q.requires_grad_()
    out = window_attention(q, k, v, w, 1, backend='eager')
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), q)
    qq = q.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(reference(qq, k, v, w, 1).square().sum(), qq, create_graph=True)
    (hr,) = torch.autograd.grad(gr.sum(), qq)
    torch.testing.assert_close(h, hr)
    nested = grad(lambda q_: grad(lambda r: window_attention(r, k, v, w, 1, backend='eager').square().sum())(q_).sum())
    torch.testing.assert_close(nested(q.detach()), hr)


# ---- resizing: always from the spec as given ------------------------------------------------------------------
def test_set_input_size_round_trips_do_not_compound():
    spec = WindowSpec.uniform(2, 3, 1)
    m = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, img_size=48, depth=2)
    with pytest.warns(UserWarning, match='resized to the model grid 7x7'):
        m.set_input_size(img_size=112)
    assert int(m.window_spec.blocks[0].max()) == 3  # ceil(1 * 7 / 3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # back at the spec's own grid: nothing is resized, nothing said
        m.set_input_size(img_size=48)
    assert m.window_spec.same_windows(spec)
    keep = vitfree.create_winft('vit_tiny_patch16_224', windows=WindowSpec.uniform(2, 8, 4), img_size=128, depth=2,
                                window_resize='keep')
    with pytest.warns(UserWarning, match='resized to the model grid 2x2'):
        keep.set_input_size(img_size=32)
    assert int(keep.window_spec.blocks[0].max()) == 1  # clipped to the 2x2 grid
    keep.set_input_size(img_size=128)
    assert int(keep.window_spec.blocks[0].max()) == 4


# ---- the property test -----------------------------------------------------------------------------------------
MODES = ('inference', 'no_grad', 'grad', 'autocast')


@st.composite
def calls(draw):
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    heads = draw(st.integers(1, 3))
    per_head = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    hi = draw(st.sampled_from([0, 1, 2, 12]))
    ext = np.random.default_rng(seed).integers(0, hi + 1, size=((heads,) if per_head else ()) + (h, w, 4))
    return dict(windows=LayerWindows(ext, (h, w)), heads=heads, prefix=draw(st.integers(0, 2)),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64])),
                backend=draw(st.sampled_from(CPU + ['auto'])), seed=seed,
                order=draw(st.lists(st.sampled_from(MODES), min_size=1, max_size=3)))


def _call(case, mode):
    w, p = case['windows'], case['prefix']
    q, k, v = _qkv(2, case['heads'], p + w.num_patches, 8, seed=case['seed'], dtype=case['dtype'])
    backend = None if case['backend'] == 'auto' else case['backend']
    if mode == 'inference':
        with torch.inference_mode():
            return window_attention(q, k, v, w, p, backend=backend), None, (q, k, v)
    if mode == 'no_grad':
        with torch.no_grad():
            return window_attention(q, k, v, w, p, backend=backend), None, (q, k, v)
    q.requires_grad_()
    if mode == 'autocast':
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = window_attention(q, k, v, w, p, backend=backend)
    else:
        out = window_attention(q, k, v, w, p, backend=backend)
    wide = out if out.dtype == torch.float64 else out.float()
    (dq,) = torch.autograd.grad(wide.square().sum(), q)
    return out.detach(), dq, (q.detach(), k, v)


def magnitudes(q, k, v, windows, prefix):
    """float64 bounds of what is summed: per output element sum_j p_ij |v_j|, and per element of dq (for
    the loss sum(out^2)) scale * sum_j p_ij (|dO_i| . |v_j| + |dO_i . out_i|) |k_j|, so a tolerance can
    follow the size of the terms, not of their (possibly cancelling) sum."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5
    allowed = windows.mask(prefix)
    allowed = (allowed if allowed.dim() == 3 else allowed.unsqueeze(0)).unsqueeze(0)
    logits = (q @ k.transpose(-2, -1) * scale).masked_fill(~allowed, float('-inf'))
    p = logits.softmax(-1)
    out = p @ v
    d_out = 2 * out
    out_mag = p @ v.abs()
    inner = d_out.abs() @ v.abs().transpose(-2, -1) + (d_out * out).sum(-1, keepdim=True).abs()
    dq_mag = scale * ((p * inner) @ k.abs())
    return out_mag, dq_mag


def _within(actual, ref, magnitude, eps):
    err = (actual.double() - ref).abs()
    assert (err <= 64 * eps * magnitude + 1e-300).all(), (err - 64 * eps * magnitude).max()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_random_specs_dtypes_modes_and_orders_against_float64(case):
    w, p = case['windows'], case['prefix']
    for mode in case['order']:
        try:
            out, dq, (q, k, v) = _call(case, mode)
        except BackendError as e:  # only a backend named for a dtype it refuses (native and float64)
            assert case['backend'] == 'native' and case['dtype'] == torch.float64 and mode != 'autocast', e
            continue
        low = mode == 'autocast' or case['dtype'] == torch.bfloat16
        eps = torch.finfo(torch.bfloat16 if low else case['dtype']).eps
        qr, kr, vr = ((x.to(torch.bfloat16) if mode == 'autocast' else x).double() for x in (q, k, v))
        qr.requires_grad_(dq is not None)
        ref = reference(qr, kr, vr, w, p)
        out_mag, dq_mag = magnitudes(qr.detach(), kr, vr, w, p)
        _within(out, ref.detach(), out_mag, eps)
        if dq is not None:
            (dq_ref,) = torch.autograd.grad(ref.square().sum(), qr)
            _within(dq, dq_ref, dq_mag, 4 * eps)
