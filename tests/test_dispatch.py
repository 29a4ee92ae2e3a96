"""The dispatcher: precedence, the automatic choice (never a backend that cannot run, never one its
table says is slower), costs from tables, the input contract, and that what ran is visible."""
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitfree
import vitfree.ops.calibration as calib
import vitfree.ops.dispatch as dispatch
import vitfree.ops.xformers_attn as xfa
from vitfree.ops import (
    Backend, BackendError, get_backend, Calibration, Fit, Query, available_backends, choose_backend, estimate_costs,
    explain_choice, list_backends, make_query, plan, register_backend, set_calibration, use_backend,
    window_attention,
)
from vitfree.windows import LayerWindows, WindowSpec

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def defaults_table():
    """The shipped CPU defaults installed as this CPU's table (so choices do not depend on the CPU)."""
    set_calibration(dataclasses.replace(calib.defaults_for('cpu'), measured=True), 'cpu')
    yield
    set_calibration(None, 'cpu')


@pytest.fixture
def restore_registry():
    saved = dict(dispatch._BACKENDS)
    yield
    dispatch._BACKENDS.clear()
    dispatch._BACKENDS.update(saved)
    dispatch._REGISTRY_VERSION[0] += 1


def _q(b, heads, grid, prefix=1, d=64):
    return torch.empty(b, heads, prefix + grid[0] * grid[1], d)


def _picked(q, w, prefix=1, backend=None):
    return plan(w, make_query(q, w.grid, prefix, q.shape[1], q.shape[-1], override=backend)).name


def test_all_backends_registered():
    assert set(list_backends()) >= {'auto', 'dense', 'eager', 'tiled', 'global', 'native', 'xformers',
                                    'xformers-dense', 'sdpa-tiles', 'flex'}
    assert all(vitfree.ops.describe_backends().values())


@pytest.mark.parametrize('grid,radius,batch,expect', [
    ((64, 64), 3, 1, 'native'),    # 1024 px, 7x7 windows
    ((48, 48), 3, 2, 'native'),
    ((14, 14), 1, 16, 'native'),   # 224 px, 3x3 windows
    ((14, 14), 7, 10, 'native'),   # 15x15 windows on a 14x14 grid: the blocked kernel still beats SDPA
                                   # (measured on the AMD EPYC of the defaults: 5.0 ms against 9.4 ms)
    ((14, 14), 20, 16, 'native'),  # windows cover the grid: even then the kernel beats unmasked SDPA here
    ((64, 64), 63, 1, 'native'),   # (measured: 14.4 against 14.3 ms, 275 against 305 ms, one thread)
])
def test_cpu_choice_at_the_default_tables_crossovers(defaults_table, grid, radius, batch, expect):
    assert choose_backend(_q(batch, 6, grid), LayerWindows(radius, grid), 1) == expect


@pytest.mark.parametrize('grid,radius,batch', [((64, 64), 3, 1), ((48, 48), 3, 2)])
def test_without_the_native_kernel_tiled_takes_over(defaults_table, monkeypatch, grid, radius, batch):
    import vitfree.ops.native as native
    monkeypatch.setattr(native, 'native_library', lambda: (None, 'no compiler (test)'))
    q, w = _q(batch, 6, grid), LayerWindows(radius, grid)
    assert choose_backend(q, w, 1) == 'tiled'
    assert 'no compiler (test)' in estimate_costs(q, w, 1)['native']


def test_auto_follows_the_table_never_a_slower_backend(restore_registry):
    """With a table that makes one backend cheapest, auto picks it; it never picks one the table prices higher."""
    w, q = LayerWindows(2, (16, 16)), _q(2, 4, (16, 16))
    base = calib.defaults_for('cpu')
    for cheapest in ('dense', 'tiled', 'native'):
        fits = {n: {k: Fit(1.0, 0.0) for k in per} for n, per in base.fits.items()}
        fits[cheapest] = {k: Fit(1e-6, 0.0) for k in base.fits[cheapest]}
        set_calibration(Calibration('test', '-', '-', 'now', fits), 'cpu')
        try:
            assert choose_backend(q, w, 1) == cheapest
            costs = estimate_costs(q, w, 1)
            assert all(costs[cheapest] <= c for c in costs.values() if isinstance(c, float))
        finally:
            set_calibration(None, 'cpu')


def test_no_table_uses_the_defaults_and_says_so_once(monkeypatch):
    monkeypatch.setattr(calib, 'device_name', lambda device: 'Imaginary CPU [avx2]')
    monkeypatch.setattr(dispatch._tables, 'device_name', calib.device_name)
    calib._found.clear()
    dispatch._warned.discard('Imaginary CPU [avx2]')
    q, w = _q(1, 2, (9, 9), d=16), LayerWindows(1, (9, 9))
    with pytest.warns(RuntimeWarning, match=r'no attention cost table measured on Imaginary CPU.*vitfree calibrate'):
        choose_backend(q, w, 1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        choose_backend(q, w, 1)  # said once
    assert 'shipped defaults' in explain_choice(q, w, 1)
    calib._found.clear()


def test_never_xformers_or_flex_automatically_on_cpu():
    for grid, r in [((64, 64), 3), ((14, 14), 5), ((32, 32), 15)]:
        costs = estimate_costs(_q(1, 6, grid), LayerWindows(r, grid), 1)
        assert 'CUDA' in costs['xformers']
        assert isinstance(costs['flex'], str) and isinstance(costs['sdpa-tiles'], str)
        assert choose_backend(_q(1, 6, grid), LayerWindows(r, grid), 1) not in ('xformers', 'flex', 'sdpa-tiles')


def _cuda_query(batch, grid, d=64):
    return Query(grid, 1, batch, 6, d, d, torch.float16, torch.device('cuda', 0), False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend the query is on a CUDA device on which xformers works (the CUDA default table)."""
    monkeypatch.setattr(xfa, '_probe', lambda *a: None)
    real = calib.device_name
    monkeypatch.setattr(calib, 'device_name', lambda d: 'Fake GPU' if torch.device(d).type == 'cuda' else real(d))
    dispatch._warned.add('Fake GPU')
    yield
    calib._found.pop('Fake GPU', None)


def test_cuda_choice_from_its_default_table(fake_cuda):
    w = LayerWindows(5, (14, 14))  # 11x11 windows on a 14x14 grid: the dense bias is cheaper than tiles
    assert dispatch._choose(_cuda_query(8, (14, 14)), w).name == 'xformers-dense'
    # tiny windows on a huge grid and batch: a linear backend, never a T^2 one
    assert dispatch._choose(_cuda_query(64, (64, 64)), LayerWindows(1, (64, 64))).name in (
        'xformers', 'sdpa-tiles', 'flex', 'tiled')
    assert dispatch._choose(_cuda_query(8, (14, 14)), LayerWindows(20, (14, 14))).name == 'global'
    assert dispatch._choose(_cuda_query(8, (14, 14)), w).name != 'native'


def test_cuda_without_a_usable_xformers_falls_back(fake_cuda, monkeypatch):
    monkeypatch.setattr(xfa, '_probe', lambda *a: 'xformers has no kernel for this GPU')
    q, w = _cuda_query(8, (14, 14)), LayerWindows(5, (14, 14))
    assert dispatch._choose(q, w).name not in ('xformers', 'xformers-dense')
    assert 'no kernel' in dispatch._estimates(q, w)['xformers'][1]
    with pytest.raises(BackendError, match="'xformers' cannot run .*xformers has no kernel.*backends that can"):
        dispatch._make_plan(w, q, 'xformers')


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
    assert name in available_backends(q, windows, prefix) and dispatch.get_backend(name).auto
    out = window_attention(q, k, v, windows, prefix)
    ref = window_attention(q.double(), k.double(), v.double(), windows, prefix, backend='eager')
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_precedence(monkeypatch):
    q, w = _q(1, 2, (8, 8), d=8), LayerWindows(1, (8, 8))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert _picked(q, w) == choose_backend(q, w, 1)
    monkeypatch.setenv(dispatch.ENV_VAR, 'eager')
    assert _picked(q, w) == 'eager'
    assert _picked(q, w, backend='tiled') == 'tiled'  # module beats env
    with use_backend('dense'):
        assert _picked(q, w, backend='tiled') == 'dense'  # context beats module
        with use_backend('auto'):  # an inner 'auto' restores the automatic choice
            assert _picked(q, w, backend='tiled') == choose_backend(q, w, 1)


def test_errors_say_what_would_work(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q, w = _q(1, 2, (8, 8), d=8), LayerWindows(1, (8, 8))
    with pytest.raises(BackendError, match=r"'global' cannot run .*windows do not cover .*backends that can"):
        _picked(q, w, backend='global')
    with pytest.raises(BackendError, match='unknown attention backend'):
        with use_backend('flash9'):
            pass
    monkeypatch.setenv(dispatch.ENV_VAR, 'nope')
    with pytest.raises(BackendError, match='VITFREE_BACKEND'):
        _picked(q, w)


def test_training_changes_the_estimate_not_the_support(defaults_table):
    w = LayerWindows(3, (32, 32))
    q = _q(2, 6, (32, 32))
    infer = estimate_costs(q, w, 1)
    train = estimate_costs(q.requires_grad_(), w, 1)
    assert train['tiled'] > infer['tiled'] and train['dense'] > infer['dense']
    with torch.no_grad():
        assert estimate_costs(q, w, 1)['tiled'] == infer['tiled']


def test_bf16_autocast_uses_the_low_precision_fits(defaults_table):
    q, w = _q(1, 6, (32, 32)), LayerWindows(3, (32, 32))
    table = calib.calibration_for('cpu')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        query = make_query(q, w.grid, 1, 6, 64)
        assert query.dtype == torch.bfloat16 and query.precision == 'lowp'
        lowp = estimate_costs(q, w, 1)
    work = get_backend('dense').work(query, w)
    assert lowp['dense'] == pytest.approx(table.fit('dense', 'lowp', False).predict(work))
    assert estimate_costs(q, w, 1)['dense'] == pytest.approx(table.fit('dense', 'fp32', False).predict(work))


class _Free(Backend):
    name = 'free'
    description = 'a test backend'

    def work(self, query, windows):
        return 0.0

    def run(self, plan, q, k, v, scale, dropout_p=0.0, attn_mask=None, probs_hook=None):
        return window_attention(q, k, v, plan.windows, plan.query.prefix, scale, backend='dense')


def test_custom_backend_costs_and_auto_flag(restore_registry):
    w, q = LayerWindows(1, (8, 8)), _q(1, 2, (8, 8), d=8)
    register_backend(_Free())
    assert 'no cost for it' in estimate_costs(q, w, 1)['free']
    fits = dict(calib.defaults_for('cpu').fits, free={'fp32-infer': Fit(0.0, 0.0)})
    set_calibration(Calibration('test', '-', '-', 'now', fits), 'cpu')
    try:
        assert choose_backend(q, w, 1) == 'free'
        manual = _Free()
        manual.auto = False
        register_backend(manual)
        assert choose_backend(q, w, 1) != 'free'
        assert 'only when named' in estimate_costs(q, w, 1)['free']
    finally:
        set_calibration(None, 'cpu')
    with pytest.raises(BackendError, match='reserved'):
        bad = _Free()
        bad.name = 'auto'
        register_backend(bad)


def test_explain_choice_names_the_pick(defaults_table):
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
        for name in ('dense', 'tiled', 'native', 'eager'):
            model.set_attn_backend(name)
            outs[name] = model(x)
            assert model.attn_backends() == [name] * 10 + ['global'] * 2
    for name in ('tiled', 'native', 'eager'):
        torch.testing.assert_close(outs[name], outs['dense'], rtol=1e-4, atol=1e-4)


def test_model_training_gradients_match():
    spec = WindowSpec.uniform(2, 6, 1)
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, img_size=96, depth=2)
    x = torch.randn(2, 3, 96, 96)
    grads = {}
    for name in ('dense', 'tiled', 'native'):
        model.zero_grad()
        model.set_attn_backend(name)
        model(x).logsumexp(-1).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in ('tiled', 'native'):
        for n in grads['dense']:
            scale = grads['dense'][n].abs().max().item()
            torch.testing.assert_close(grads[name][n], grads['dense'][n], rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                       msg=n)
