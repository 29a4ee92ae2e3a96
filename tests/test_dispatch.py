"""The dispatcher: precedence, the automatic choice (never a backend that cannot run), the cost
model's crossovers, and that the chosen backend is visible afterwards."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitfree
import vitfree.ops.dispatch as dispatch
import vitfree.ops.xformers_attn as xfa
from vitfree.ops import (
    BackendError, choose_backend, dense_window_attention, estimate_costs, explain_choice, list_backends,
    register_backend, resolve_backend, use_backend, window_attention,
)
from vitfree.windows import LayerWindows, WindowSpec


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def restore_registry():
    saved = dict(dispatch._BACKENDS)
    yield
    dispatch._BACKENDS.clear()
    dispatch._BACKENDS.update(saved)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend q lives on a CUDA device on which xformers works."""
    monkeypatch.setattr(xfa, '_on_cuda', lambda q: True)
    monkeypatch.setattr(xfa, '_probe', lambda *a: None)
    monkeypatch.setattr(dispatch, 'cost_model', lambda q: dispatch.COST_MODELS['cuda'])


def _q(b, heads, grid, prefix=1, d=64):
    return torch.empty(b, heads, prefix + grid[0] * grid[1], d)


def test_all_backends_registered():
    assert set(list_backends()) >= {'auto', 'dense', 'eager', 'tiled', 'global', 'xformers'}


@pytest.mark.parametrize('grid,radius,batch,expect', [
    ((64, 64), 3, 1, 'native'),    # 1024 px, 7x7 windows: measured 17x faster than dense
    ((48, 48), 3, 2, 'native'),
    ((14, 14), 1, 16, 'native'),   # 224 px, 3x3 windows: measured ~3x faster than dense
    ((14, 14), 7, 10, 'dense'),    # 15x15 windows on a 14x14 grid: native measured 2x slower than dense
    ((14, 14), 20, 16, 'global'),  # windows cover the grid
    ((64, 64), 63, 1, 'global'),
])
def test_cpu_choice_at_the_measured_crossovers(grid, radius, batch, expect):
    assert choose_backend(_q(batch, 6, grid), LayerWindows(radius, grid), 1) == expect


@pytest.mark.parametrize('grid,radius,batch,expect', [((64, 64), 3, 1, 'tiled'), ((48, 48), 3, 2, 'tiled')])
def test_without_the_native_kernel_tiled_takes_over(monkeypatch, grid, radius, batch, expect):
    import vitfree.ops.native as native
    monkeypatch.setattr(native, 'native_library', lambda: (None, 'no compiler (test)'))
    q, w = _q(batch, 6, grid), LayerWindows(radius, grid)
    assert choose_backend(q, w, 1) == expect
    assert 'no compiler (test)' in estimate_costs(q, w, 1)['native']


def test_never_xformers_on_cpu():
    for grid, r in [((64, 64), 3), ((14, 14), 5), ((32, 32), 15)]:
        costs = estimate_costs(_q(1, 6, grid), LayerWindows(r, grid), 1)
        assert 'CUDA' in costs['xformers']
        assert choose_backend(_q(1, 6, grid), LayerWindows(r, grid), 1) != 'xformers'


def test_cuda_with_xformers(fake_cuda):
    w = LayerWindows(5, (14, 14))  # 11x11 windows on a 14x14 grid: the dense bias is cheaper than tiles
    assert choose_backend(_q(8, 6, (14, 14)), w, 1) == 'xformers-dense'
    # tiny windows on a huge grid and batch: a linear backend, never a T^2 one
    assert choose_backend(_q(64, 6, (64, 64)), LayerWindows(1, (64, 64)), 1) in ('xformers', 'sdpa-tiles', 'flex',
                                                                                  'tiled')
    # covering windows still go to the unmasked kernel
    assert choose_backend(_q(8, 6, (14, 14)), LayerWindows(20, (14, 14)), 1) == 'global'


def test_cuda_without_a_usable_xformers_falls_back(monkeypatch):
    monkeypatch.setattr(xfa, '_on_cuda', lambda q: True)
    monkeypatch.setattr(xfa, '_probe', lambda *a: 'xformers has no kernel for this GPU')
    monkeypatch.setattr(dispatch, 'cost_model', lambda q: dispatch.COST_MODELS['cuda'])
    q, w = _q(8, 6, (14, 14)), LayerWindows(5, (14, 14))
    assert choose_backend(q, w, 1) in ('dense', 'tiled')
    assert 'no kernel' in estimate_costs(q, w, 1)['xformers']
    with pytest.raises(BackendError, match="'xformers' cannot run here: xformers has no kernel"):
        resolve_backend(q, w, 1, backend='xformers')


@st.composite
def cases(draw):
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    heads = draw(st.integers(1, 3))
    per_head = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    hi = draw(st.sampled_from([0, 2, 6, 20]))
    ext = np.random.default_rng(seed).integers(0, hi + 1, size=((heads,) if per_head else ()) + (h, w, 4))
    return LayerWindows(ext, (h, w)), heads, draw(st.sampled_from([0, 1, 5])), draw(st.integers(1, 3)), seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_auto_only_picks_backends_that_run_and_agree(case):
    windows, heads, prefix, batch, seed = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, prefix + windows.num_patches, 8, generator=g) for _ in range(3))
    name = choose_backend(q, windows, prefix)
    assert dispatch._BACKENDS[name].supports(q, windows) is None and dispatch._BACKENDS[name].auto
    out = window_attention(q, k, v, windows, prefix)
    torch.testing.assert_close(out, dense_window_attention(q, k, v, windows, prefix), rtol=1e-5, atol=1e-5)


def test_precedence(monkeypatch):
    q, w = _q(1, 2, (8, 8), d=8), LayerWindows(1, (8, 8))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert resolve_backend(q, w, 1) == choose_backend(q, w, 1)
    monkeypatch.setenv(dispatch.ENV_VAR, 'eager')
    assert resolve_backend(q, w, 1) == 'eager'
    assert resolve_backend(q, w, 1, backend='tiled') == 'tiled'  # module beats env
    with use_backend('dense'):
        assert resolve_backend(q, w, 1, backend='tiled') == 'dense'  # context beats module
        with use_backend('auto'):  # an inner 'auto' restores the automatic choice
            assert resolve_backend(q, w, 1, backend='tiled') == choose_backend(q, w, 1)


def test_errors_say_what_would_work(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q, w = _q(1, 2, (8, 8), d=8), LayerWindows(1, (8, 8))
    with pytest.raises(BackendError, match=r"'global' cannot run here: windows do not cover .*backends that can"):
        resolve_backend(q, w, 1, backend='global')
    with pytest.raises(BackendError, match='unknown attention backend'):
        with use_backend('flash9'):
            pass
    monkeypatch.setenv(dispatch.ENV_VAR, 'nope')
    with pytest.raises(BackendError, match='VITFREE_BACKEND'):
        resolve_backend(q, w, 1)


def test_training_changes_the_estimate_not_the_support():
    w = LayerWindows(3, (32, 32))
    q = _q(2, 6, (32, 32))
    infer = estimate_costs(q, w, 1)
    train = estimate_costs(q.requires_grad_(), w, 1)
    assert train['tiled'] > infer['tiled'] and train['dense'] > infer['dense']
    with torch.no_grad():
        assert estimate_costs(q, w, 1)['tiled'] == infer['tiled']


def test_bf16_autocast_uses_the_low_precision_model():
    q = _q(1, 6, (32, 32))
    assert dispatch.cost_model(q) is dispatch.COST_MODELS['cpu']
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert dispatch.cost_model(q) is dispatch.COST_MODELS['cpu-lowp']


def test_custom_backend_costs_and_auto_flag(restore_registry):
    w = LayerWindows(1, (8, 8))
    q = _q(1, 2, (8, 8), d=8)
    register_backend('free', dense_window_attention, cost=lambda q, w, p: 0.0)
    assert choose_backend(q, w, 1) == 'free'
    register_backend('free', dense_window_attention, cost=lambda q, w, p: 0.0, auto=False)
    assert choose_backend(q, w, 1) != 'free'
    assert 'only when named' in estimate_costs(q, w, 1)['free']
    with pytest.raises(BackendError, match='reserved'):
        register_backend('auto', dense_window_attention)


def test_explain_choice_names_the_pick():
    text = explain_choice(_q(1, 6, (64, 64)), LayerWindows(3, (64, 64)), 1)
    assert "auto picks 'native'" in text and '* native' in text and 'xformers' in text and 'tiled' in text


def test_model_reports_what_ran_and_backends_agree(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    spec = WindowSpec.uniform(12, 8, 2, global_blocks=(10, 11))
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, img_size=128).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        model(x)
        auto = model.attn_backends()
        assert auto[10:] == ['global', 'global'] and all(b in list_backends() for b in auto[:10])
        outs = {}
        for name in ('dense', 'tiled'):
            model.set_attn_backend(name)
            outs[name] = model(x)
            assert model.attn_backends() == [name] * 10 + ['global'] * 2
    torch.testing.assert_close(outs['tiled'], outs['dense'], rtol=1e-4, atol=1e-4)


def test_model_training_gradients_match():
    spec = WindowSpec.uniform(2, 6, 1)
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, img_size=96, depth=2)
    x = torch.randn(2, 3, 96, 96)
    grads = {}
    for name in ('dense', 'tiled'):
        model.zero_grad()
        model.set_attn_backend(name)
        model(x).logsumexp(-1).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n in grads['dense']:
        torch.testing.assert_close(grads['tiled'][n], grads['dense'][n], rtol=1e-4, atol=1e-5, msg=n)
