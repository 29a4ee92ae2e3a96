"""The xformers backend's argument preparation, checked on CPU (xformers itself needs CUDA)."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import vitfree.ops.xformers_attn as xfa
from vitfree.ops import Plan, dense_window_attention, get_backend, make_query
from vitfree.ops.xformers_attn import window_bias, xformers_inputs, xformers_supports
from vitfree.windows import LayerWindows


pytestmark = pytest.mark.usefixtures('one_thread')


def _windows(per_head=False, grid=(5, 7), heads=3, seed=0):
    shape = ((heads,) if per_head else ()) + (*grid, 4)
    return LayerWindows(np.random.default_rng(seed).integers(0, 3, size=shape), grid)


def _run(name, q, k, v, windows, prefix, scale=None):
    """Backend ``name`` on CPU tensors, its CUDA-only support check bypassed (the kernel is faked)."""
    b = get_backend(name)
    query = make_query(q, windows.grid, prefix, q.shape[1], q.shape[-1], v.shape[-1])
    return Plan(b, windows, query, b.prepare(windows, query))(q, k, v, scale)


def _xformers_alignment_problems(bias: torch.Tensor):
    """What xformers checks on a tensor bias (16-byte aligned strides, unit last stride)."""
    align = 128 // torch.finfo(bias.dtype).bits
    bad = [d for d in range(bias.dim() - 1) if bias.stride(d) % align]
    return bad + (['last'] if bias.stride(-1) != 1 else [])


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize('per_head', [False, True])
@pytest.mark.parametrize('prefix', [0, 1, 5])
def test_bias_shape_dtype_alignment_and_values(dtype, per_head, prefix):
    windows = _windows(per_head)
    t = prefix + 35
    bias = window_bias(windows, prefix, dtype, 'cpu', batch=2, num_heads=3)
    assert bias.shape == (2, 3, t, t) and bias.dtype == dtype
    assert bias.stride(0) == 0 and (bias.stride(1) == 0) != per_head
    assert _xformers_alignment_problems(bias) == []
    assert bias.stride(-2) % 8 == 0 and bias.stride(-2) >= t  # padded rows
    assert bias.untyped_storage().nbytes() == (3 if per_head else 1) * t * (-(-t // 8) * 8) * bias.element_size()
    allowed = windows.mask(prefix).expand(2, 3, t, t)
    assert torch.all(bias[allowed] == 0)
    assert torch.all(torch.isneginf(bias[~allowed]))
    assert torch.equal(torch.isneginf(bias), ~allowed)  # -inf exactly outside the windows


def test_bias_is_cached_storage():
    windows = _windows()
    a = window_bias(windows, 1, torch.float16, 'cpu', 2, 3)
    b = window_bias(windows, 1, torch.float16, 'cpu', 4, 3)
    assert a.data_ptr() == b.data_ptr()
    assert window_bias(windows, 1, torch.float32, 'cpu', 2, 3).data_ptr() != a.data_ptr()


def test_bias_rejects_wrong_head_count():
    with pytest.raises(ValueError, match='per head for 3 heads'):
        window_bias(_windows(per_head=True), 1, torch.float16, 'cpu', 1, 4)


def test_inputs_are_bmhk_views():
    windows = _windows()
    qkv = torch.randn(2, 36, 3, 3, 8)  # timm's layout before the permute
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    qx, kx, vx, bias = xformers_inputs(q, k, v, windows, 1)
    for x, src in ((qx, q), (kx, k), (vx, v)):
        assert x.shape == (2, 36, 3, 8) and x.stride(-1) == 1
        assert x.data_ptr() == src.data_ptr()  # no copy
        assert torch.equal(x, src.transpose(1, 2))
    assert bias.shape == (2, 3, 36, 36) and bias.dtype == q.dtype


def _reference_mea(query, key, value, attn_bias=None, p=0.0, scale=None):
    """xformers' documented equivalent of memory_efficient_attention, plus its bias checks."""
    assert query.dim() == 4 and query.stride(-1) == 1
    if attn_bias is not None:
        assert attn_bias.shape == (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
        assert attn_bias.dtype == query.dtype
        assert _xformers_alignment_problems(attn_bias) == []
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    attn = (q * scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
        attn = attn + attn_bias
    return (attn.softmax(-1) @ v).transpose(1, 2)


@pytest.fixture
def fake_xformers(monkeypatch):
    ops = types.ModuleType('xformers.ops')
    ops.memory_efficient_attention = _reference_mea
    pkg = types.ModuleType('xformers')
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, 'xformers', pkg)
    monkeypatch.setitem(sys.modules, 'xformers.ops', ops)
    monkeypatch.setattr(xfa, '_xformers', None)
    monkeypatch.setattr(xfa, '_import_error', None)
    monkeypatch.setattr(xfa, '_probe_results', {})
    return ops


@pytest.mark.parametrize('per_head', [False, True])
def test_wrapper_with_reference_kernel_equals_dense(fake_xformers, per_head):
    windows = _windows(per_head)
    q, k, v = (torch.randn(2, 3, 36, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = _run('xformers', q, k, v, windows, 1, scale=0.3)
    ref = dense_window_attention(q, k, v, windows, 1, scale=0.3)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_probe_reports_unsupported_kernels(fake_xformers):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError('No operator found for `memory_efficient_attention_forward`\nmore')
    fake_xformers.memory_efficient_attention = no_kernel
    reason = xfa._probe(torch.device('cpu'), torch.float32, 8, 8)
    assert 'no kernel for torch.float32, head_dim 8' in reason and 'No operator found' in reason
    fake_xformers.memory_efficient_attention = _reference_mea
    assert xfa._probe(torch.device('cpu'), torch.float32, 8, 8) == reason  # remembered
    assert xfa._probe(torch.device('cpu'), torch.float32, 16, 16) is None


def test_supports_refuses_cpu_without_importing():
    q = torch.randn(1, 2, 36, 8)
    windows = _windows()
    assert 'CUDA' in xformers_supports(make_query(q, windows.grid, 1, 2, 8), windows)


def test_missing_xformers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, 'xformers', None)  # import fails
    monkeypatch.setitem(sys.modules, 'xformers.ops', None)
    monkeypatch.setattr(xfa, '_xformers', None)
    monkeypatch.setattr(xfa, '_import_error', None)
    mod, reason = xfa.import_xformers()
    assert mod is None and 'vitfree[gpu]' in reason
    with pytest.raises(RuntimeError, match='not usable'):
        _run('xformers', *(torch.randn(1, 1, 35, 8) for _ in range(3)), _windows(), 0)


def test_cpu_users_never_import_xformers():
    code = (
        'import sys, warnings, torch, timm, vitfree\n'
        'warnings.simplefilter("error")\n'
        'warnings.filterwarnings("ignore", message="vitfree: no attention cost table")  # a CPU without its table\n'
        'from vitfree.windows import WindowSpec\n'
        'm = vitfree.create_winft("vit_tiny_patch16_224", windows=WindowSpec.uniform(12, 4, 1), img_size=64)\n'
        'm.eval()\n'
        'with torch.no_grad(): m(torch.randn(1, 3, 64, 64))\n'
        'print(sorted(set(m.attn_backends())))\n'
        'assert "xformers" not in sys.modules, "xformers was imported on CPU"\n'
    )
    env = dict(os.environ, OMP_NUM_THREADS='1')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert 'xformers' not in res.stderr.lower()


# ---- the linear path: batched tiles with per-tile biases ----------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vitfree.ops.fused_tiles import (  # noqa: E402
    BIAS_ALIGN, choose_fused_tile, fused_tiles_attention, gather_tiles, sdpa_tiles_attention, tile_batch, tile_bias,
)
from vitfree.ops.tiled import plan_tiles  # noqa: E402


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize('per_head', [False, True])
@pytest.mark.parametrize('prefix', [0, 1, 2])
def test_tile_bias_is_each_patch_window_aligned(dtype, per_head, prefix):
    windows = _windows(per_head, grid=(7, 9))
    batch = tile_batch(windows, prefix, 'cpu', (3, 4))
    bias = tile_bias(windows, prefix, 'cpu', dtype, (3, 4))
    nt, qt, kt = batch.num_tiles, batch.tile_queries, batch.tile_keys
    assert bias.shape == (1, nt * (3 if per_head else 1), qt, kt) and bias.dtype == dtype
    assert _xformers_alignment_problems(bias.expand(5, *bias.shape[1:])) == []
    assert bias.stride(-2) % BIAS_ALIGN == 0 and bias.stride(-1) == 1
    # every entry is 0 or -inf, and 0 exactly where the key token is in the query patch's window
    full = windows.mask(prefix)  # (T, T) or (heads, T, T)
    if not per_head:
        full = full.unsqueeze(0)
    plan = plan_tiles(windows, prefix, (3, 4))
    q_tok = plan.query_index.view(nt, qt)
    k_tok = plan.key_index.view(nt, kt)
    valid = (plan.grad_index < windows.num_patches).view(nt, qt)
    b = bias.view(nt, -1, qt, kt)  # (nt, heads, Qt, Kt)
    for head in range(full.shape[0]):
        want = full[head][q_tok[:, :, None], k_tok[:, None, :]]  # (nt, Qt, Kt)
        got = b[:, head] == 0
        assert torch.equal(got[valid], want[valid])
        assert torch.all(got[~valid])  # padding rows allow everything (they are dropped)
        assert torch.all(torch.isneginf(b[:, head][~got]))


def test_every_window_key_is_in_its_tile_halo():
    """The tiles lose nothing: the number of allowed (query, key) pairs over all tiles equals the
    dense mask's count, for every patch."""
    windows = _windows(True, grid=(13, 11))
    for tile in [(1, 1), (4, 4), (8, 16), (13, 11)]:
        plan = plan_tiles(windows, 1, tile)
        valid = plan.grad_index < windows.num_patches
        allowed = plan.allowed.flatten(1, 2)[:, valid]  # (heads, N, Kt)
        dense = windows.mask(1)[:, 1:]  # (heads, N, T)
        order = plan.grad_index[valid]
        assert torch.equal(allowed.sum(-1), dense[:, order].sum(-1))


def test_gather_is_one_copy_in_the_kernel_layout():
    windows = _windows(grid=(5, 7))
    batch = tile_batch(windows, 1, 'cpu', (2, 3))
    qkv = torch.randn(2, 36, 3, 3, 8)  # timm's (B, N, 3, heads, d) before the permute
    q = qkv.permute(2, 0, 3, 1, 4)[0]
    nt, qt = batch.num_tiles, batch.tile_queries
    shared = gather_tiles(q, batch.q_index, qt, nt, per_head=False)
    assert shared.shape == (2 * 3, qt, nt, 8) and shared.is_contiguous()
    per_head = gather_tiles(q, batch.q_index, qt, nt, per_head=True)
    assert per_head.shape == (2, qt, nt * 3, 8) and per_head.is_contiguous()
    # row j of tile i holds the token q_index[j*nt + i], head h at tile*heads + h
    tok = batch.q_index.view(qt, nt)
    assert torch.equal(shared.view(2, 3, qt, nt, 8)[1, 2, 4, 1], q[1, 2, tok[4, 1]])
    assert torch.equal(per_head.view(2, qt, nt, 3, 8)[1, 4, 1, 2], q[1, 2, tok[4, 1]])


def test_fused_tile_choice_prefers_whole_kernel_blocks():
    tile = choose_fused_tile(LayerWindows(3, (64, 64)), 1)
    assert (tile[0] * tile[1]) % 64 == 0
    assert choose_fused_tile(LayerWindows(3, (14, 14)), 1) == (14, 14)  # one tile: the halo is the grid


@st.composite
def window_cases(draw):
    h, w = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    heads = draw(st.integers(1, 3))
    per_head = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    hi = draw(st.sampled_from([0, 1, 3, 12]))
    ext = np.random.default_rng(seed).integers(0, hi + 1, size=((heads,) if per_head else ()) + (h, w, 4))
    tile = draw(st.one_of(st.none(), st.tuples(st.integers(1, 6), st.integers(1, 6))))
    return LayerWindows(ext, (h, w)), heads, draw(st.integers(0, 2)), draw(st.integers(1, 2)), tile, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window_cases())
def test_batched_tiles_equal_dense_outputs_and_gradients(case):
    """The tile batching with xformers' documented reference kernel (which also checks the bias
    shape, dtype and alignment) and with SDPA, against the dense reference, in float64."""
    windows, heads, prefix, batch, tile, seed = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, prefix + windows.num_patches, 8, generator=g, dtype=torch.float64)
               .requires_grad_() for _ in range(3))
    ref = dense_window_attention(q, k, v, windows, prefix, scale=0.4)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    kernel = lambda q_, k_, v_, bias, scale, p: _reference_mea(q_, k_, v_, attn_bias=bias, p=p, scale=scale)  # noqa: E731
    tiles = tile_batch(windows, prefix, 'cpu', tile)
    bias = tile_bias(windows, prefix, 'cpu', q.dtype, tiles.tile)
    for kern in (kernel, None):
        out = fused_tiles_attention(q, k, v, tiles, bias, prefix, windows.per_head, 0.4, kernel=kern)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_tiles_low_precision_and_autocast(dtype, tol):
    windows = _windows(True, grid=(7, 9))
    q, k, v = (torch.randn(2, 3, 64, 16) for _ in range(3))
    ref = dense_window_attention(q, k, v, windows, 1)
    out = sdpa_tiles_attention(q.to(dtype), k.to(dtype), v.to(dtype), windows, 1)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        auto = sdpa_tiles_attention(q, k, v, windows, 1)
    assert auto.dtype == torch.bfloat16
    torch.testing.assert_close(auto.float(), ref, rtol=2e-2, atol=2e-2)


def test_xformers_tiles_and_dense_through_the_fake_kernel(fake_xformers):
    windows = _windows(grid=(9, 7))
    q, k, v = (torch.randn(2, 3, 64, 8, dtype=torch.float64) for _ in range(3))
    ref = dense_window_attention(q, k, v, windows, 1)
    for name in ('xformers', 'xformers-dense'):
        torch.testing.assert_close(_run(name, q, k, v, windows, 1), ref, rtol=1e-10, atol=1e-10)


def test_prepare_builds_what_a_call_reads():
    """A plan's prepared data are the backend's cached tensors: preparing again returns the same objects."""
    windows = _windows(grid=(9, 7))
    query = make_query(torch.empty(1, 3, 64, 8, dtype=torch.float16), windows.grid, 1, 3, 8)
    b = get_backend('xformers')
    batch, bias = b.prepare(windows, query)
    again = b.prepare(windows, query)
    assert again[0] is batch and again[1].data_ptr() == bias.data_ptr()
    assert tile_batch(windows, 1, 'cpu') is batch
