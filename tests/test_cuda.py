"""Every CUDA backend against the dense reference, outputs and gradients, in float32, bfloat16
and float16, on odd grids, per-head windows and 0-2 prefix tokens; a whole WinfT forward and
backward under autocast; torch.compile; and the dispatcher with a calibration.

Skipped without CUDA (this suite's CPU machines have none); ``benchmarks/run_cuda.sh tests``
runs them on a GPU and keeps the log.  FlexAttention compiles one graph per shape, so its
cases are a chosen subset (each takes seconds to compile)."""
import numpy as np
import pytest
import torch

import vitfree
from vitfree.ops import (
    BackendError, available_backends, choose_backend, dense_window_attention, explain_choice, window_attention,
)
from vitfree.windows import LayerWindows, WindowSpec

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

DEV = 'cuda'
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative error of the whole tensor
GRIDS = [(7, 9), (13, 11)]
CHEAP = ['tiled', 'dense', 'sdpa-tiles', 'xformers', 'xformers-dense']
# FlexAttention: one compile per (shape, dtype, shared/per-head), so a covering subset
FLEX_CASES = [((7, 9), False, 1), ((13, 11), True, 2), ((13, 11), False, 0)]


def _windows(grid, per_head, heads=3, seed=0):
    shape = ((heads,) if per_head else ()) + (*grid, 4)
    return LayerWindows(np.random.default_rng(seed).integers(0, 4, size=shape), grid)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _check(name, grid, per_head, prefix, dtype, d=32):
    windows = _windows(grid, per_head)
    g = torch.Generator(device='cpu').manual_seed(1)
    base = [torch.randn(2, 3, prefix + windows.num_patches, d, generator=g) for _ in range(3)]
    q, k, v = (x.to(DEV, dtype).requires_grad_() for x in base)
    if name not in available_backends(q, windows, prefix):
        pytest.skip(f'{name} cannot run here')
    out = window_attention(q, k, v, windows, prefix, backend=name)
    grad = torch.randn_like(out)
    out.backward(grad)
    # reference: the dense backend in float32 on the same (rounded) inputs
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = dense_window_attention(qr, kr, vr, windows, prefix)
    ref.backward(grad.float())
    assert out.dtype == dtype and out.shape == q.shape
    tol = TOL[dtype]
    assert _rel(out, ref) < tol, (name, 'output', _rel(out, ref))
    for x, r, what in ((q, qr, 'dq'), (k, kr, 'dk'), (v, vr, 'dv')):
        assert torch.isfinite(x.grad).all(), (name, what)
        assert _rel(x.grad, r.grad) < 2 * tol, (name, what, _rel(x.grad, r.grad))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('prefix', [0, 1, 2])
@pytest.mark.parametrize('per_head', [False, True], ids=['shared', 'per_head'])
@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: f'{g[0]}x{g[1]}')
@pytest.mark.parametrize('name', CHEAP)
def test_backend_matches_dense(name, grid, per_head, prefix, dtype):
    _check(name, grid, per_head, prefix, dtype)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('grid,per_head,prefix', FLEX_CASES)
def test_flex_matches_dense(grid, per_head, prefix, dtype):
    _check('flex', grid, per_head, prefix, dtype)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_global_matches_dense_on_covering_windows(dtype):
    windows = LayerWindows(20, (7, 9))
    q, k, v = (torch.randn(2, 3, 64, 32, device=DEV, dtype=dtype) for _ in range(3))
    out = window_attention(q, k, v, windows, 1, backend='global')
    ref = dense_window_attention(q.float(), k.float(), v.float(), windows, 1)
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize('name', ['flex', 'sdpa-tiles', 'xformers', 'tiled'])
def test_large_grid_vit_s_shapes(name):
    """ViT-S heads (6 x 64) on a 48x48 grid with 7x7 windows, bfloat16, forward and backward."""
    windows = LayerWindows(3, (48, 48))
    q, k, v = (torch.randn(2, 6, 1 + 48 * 48, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    if name not in available_backends(q, windows, 1):
        pytest.skip(f'{name} cannot run here')
    out = window_attention(q, k, v, windows, 1, backend=name)
    out.float().square().mean().backward()
    ref = dense_window_attention(q.detach().float(), k.detach().float(), v.detach().float(), windows, 1)
    assert _rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize('name', ['dense', 'tiled', 'sdpa-tiles', 'xformers', 'flex', 'auto'])
def test_winft_forward_backward_under_autocast(name):
    spec = WindowSpec.uniform(4, (10, 12), 2, global_blocks=(3,))
    torch.manual_seed(0)
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, img_size=(160, 192), depth=4).to(DEV)
    x = torch.randn(2, 3, 160, 192, device=DEV)
    ref_model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, img_size=(160, 192), depth=4).to(DEV)
    ref_model.load_state_dict(model.state_dict())
    ref_model.set_attn_backend('dense')
    ref_out = ref_model(x)  # float32 reference
    ref_out.float().logsumexp(-1).sum().backward()
    model.set_attn_backend(None if name == 'auto' else name)
    try:
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(x)
    except BackendError as e:
        pytest.skip(str(e))
    out.float().logsumexp(-1).sum().backward()
    ran = model.attn_backends()
    assert ran[3] == 'global' and (name == 'auto' or ran[:3] == [name] * 3), ran
    assert _rel(out, ref_out) < 5e-2
    for (n, p), (_, pr) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.isfinite(p.grad).all(), n
        assert _rel(p.grad, pr.grad) < 0.15, (n, _rel(p.grad, pr.grad))


@pytest.mark.parametrize('name', ['flex', 'sdpa-tiles'])
def test_torch_compile_keeps_the_backend(name):
    spec = WindowSpec.uniform(2, (8, 8), 1)
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, img_size=128, depth=2,
                                 attn_backend=name).to(DEV).eval()
    x = torch.randn(2, 3, 128, 128, device=DEV)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert model.attn_backends() == [name, name]
    assert _rel(compiled, eager) < 2e-2


def test_auto_picks_a_runnable_backend_and_says_where_costs_come_from():
    windows = LayerWindows(3, (32, 32))
    q, k, v = (torch.randn(2, 6, 1025, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    name = choose_backend(q, windows, 1)
    assert name in available_backends(q, windows, 1)
    text = explain_choice(q, windows, 1)
    assert 'costs: ' in text, text  # a shipped or cached table, or the shipped defaults (said so)
    out = window_attention(q, k, v, windows, 1)
    ref = dense_window_attention(q.float(), k.float(), v.float(), windows, 1)
    assert _rel(out, ref) < TOL[torch.bfloat16]


def test_quick_calibration_runs_and_installs(tmp_path, monkeypatch):
    import vitfree.ops.calibrate as measure
    import vitfree.ops.calibration as calib
    monkeypatch.setenv('VITFREE_CACHE_DIR', str(tmp_path))
    try:
        cal = measure.calibrate('cuda', ['dense', 'sdpa-tiles'], measure.QUICK_SHAPES[:2], None, modes=(False,),
                                progress=None)
        assert set(cal.fits) == {'dense', 'sdpa-tiles'}
        assert cal.device == torch.cuda.get_device_name()
        assert calib.calibration_for('cuda') is cal
    finally:
        calib.set_calibration(None, 'cuda')
