"""The xformers backend's argument preparation, checked on CPU (xformers itself needs CUDA)."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import vitfree.ops.xformers_attn as xfa
from vitfree.ops import dense_window_attention, window_bias, xformers_inputs, xformers_supports
from vitfree.windows import LayerWindows


pytestmark = pytest.mark.usefixtures('one_thread')


def _windows(per_head=False, grid=(5, 7), heads=3, seed=0):
    shape = ((heads,) if per_head else ()) + (*grid, 4)
    return LayerWindows(np.random.default_rng(seed).integers(0, 3, size=shape), grid)


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
    out = xfa.xformers_window_attention(q, k, v, windows, 1, scale=0.3)
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
    assert 'CUDA' in xformers_supports(q, _windows())


def test_missing_xformers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, 'xformers', None)  # import fails
    monkeypatch.setitem(sys.modules, 'xformers.ops', None)
    monkeypatch.setattr(xfa, '_xformers', None)
    monkeypatch.setattr(xfa, '_import_error', None)
    mod, reason = xfa.import_xformers()
    assert mod is None and 'vitfree[gpu]' in reason
    with pytest.raises(RuntimeError, match='not usable'):
        xfa.xformers_window_attention(*(torch.randn(1, 1, 35, 8) for _ in range(3)), _windows(), 0)


def test_cpu_users_never_import_xformers():
    code = (
        'import sys, warnings, torch, timm, vitfree\n'
        'warnings.simplefilter("error")\n'
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
