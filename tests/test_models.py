"""WinfT in timm: equality with ViT for global specs, strict loading, the timm model contract."""
import copy

import numpy as np
import pytest
import timm
import torch

import vitfree
from vitfree import WindowSpec, WinfT, create_winft
from vitfree.windows import WindowSpecError

SIX = [f'winft_{s}_patch16_{r}' for s in ('tiny', 'small', 'base') for r in (224, 384)]
# small shapes so the contract tests stay fast; the registered shapes are checked on the meta device
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3)


def tiny_spec(grid=8, depth=3, seed=0, per_head=False):
    rng = np.random.default_rng(seed)
    shape = (3, grid, grid, 4) if per_head else (grid, grid, 4)
    return WindowSpec(grid, [rng.integers(0, 3, size=shape), rng.integers(0, 2, size=shape), None][:depth],
                      {'kind': 'uniform'})


def test_six_models_registered():
    names = timm.list_models('winft_*')
    assert set(SIX) <= set(names)
    assert 'winft_small_patch16_224.fb_in1k' in timm.list_models('winft_*', pretrained=True)


@pytest.mark.parametrize('name', SIX)
def test_registered_shapes_match_timm_vit(name):
    """Same parameter names and shapes as the timm ViT of that size (built on the meta device)."""
    vit_name = name.replace('winft_', 'vit_')
    with torch.device('meta'):
        w = timm.create_model(name)
        v = timm.create_model(vit_name)
    ws = {k: tuple(t.shape) for k, t in w.state_dict().items()}
    vs = {k: tuple(t.shape) for k, t in v.state_dict().items()}
    assert ws == vs
    assert isinstance(w, WinfT) and w.window_spec.grid == w.patch_embed.grid_size
    assert w.window_spec.provenance['kind'] == 'prior'


@pytest.mark.parametrize('base', ['vit_tiny_patch16_224', 'deit_tiny_patch16_224'])
def test_all_global_equals_vit_forward_backward(base):
    vit = timm.create_model(base, img_size=64, drop_path_rate=0.0)
    win = create_winft(base, windows=WindowSpec.all_global(12, 4), img_size=64)
    win.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    yv, yw = vit(x), win(x)
    assert (yv - yw).abs().max() < 1e-5
    yv.square().sum().backward()
    yw.square().sum().backward()
    gv = dict(vit.named_parameters())
    for n, p in win.named_parameters():
        assert (p.grad - gv[n].grad).abs().max() < 1e-5, n
    assert win.attn_backends() == ['global'] * 12


def test_registered_all_global_equals_vit():
    vit = timm.create_model('vit_small_patch16_224', img_size=48, depth=4)
    win = timm.create_model('winft_small_patch16_224', img_size=48, depth=4, windows=WindowSpec.all_global(4, 3))
    win.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(1, 3, 48, 48)
    assert (vit(x) - win(x)).abs().max() < 1e-5


def test_vit_state_dict_loads_strictly_and_windows_change_output():
    vit = timm.create_model('vit_tiny_patch16_224')
    win = timm.create_model('winft_tiny_patch16_224')
    res = win.load_state_dict(vit.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert set(win.state_dict()) == set(vit.state_dict())  # no window buffers in the state dict
    x = torch.randn(1, 3, 224, 224)
    assert (vit(x) - win(x)).abs().max() > 1e-4  # the prior windows really constrain attention
    assert win.attn_backends()[:8] != ['global'] * 8 and win.attn_backends()[8:] == ['global'] * 4


def test_windows_restrict_information_flow():
    """A patch outside every window chain of patch 0 cannot change patch 0's output."""
    spec = WindowSpec.uniform(2, 8, 1)  # two blocks of 3x3 windows: receptive field radius 2
    m = WinfT(windows=spec, class_token=False, global_pool='avg', **dict(TINY, depth=2)).eval()
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[..., 16:, 16:] += 5.0  # patches with row, col >= 4: more than 2 hops from patch (0, 0)
    f1, f2 = m.forward_features(x), m.forward_features(x2)
    assert (f1[0, 0] - f2[0, 0]).abs().max() < 1e-6
    assert (f1[0, -1] - f2[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize('per_head', [False, True])
def test_dense_and_eager_models_agree(per_head):
    """Both paths against the same model in float64 (the exact reference), with tolerances that follow
    the size of what is compared: outputs per element against their largest magnitude, gradients as
    one vector against its norm (a gradient that is zero in exact arithmetic, such as the key bias's,
    is rounding noise in float32 on any CPU)."""
    m = WinfT(windows=tiny_spec(per_head=per_head), reg_tokens=2, **TINY)
    x = torch.randn(2, 3, 32, 32)

    def run(model, backend, inp):
        model.zero_grad()
        with vitfree.use_backend(backend):
            y = model(inp)
        y.square().sum().backward()
        assert model.attn_backends() == [backend, backend, 'global']
        return y.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    ref64 = copy.deepcopy(m).double()
    y_ref, g_ref = run(ref64, 'eager', x.double())
    eps = torch.finfo(torch.float32).eps
    for b in ('dense', 'eager'):
        y, g = run(m, b, x)
        torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=256 * eps * y_ref.abs().max().item())
        assert (g.double() - g_ref).norm() <= 256 * eps * g_ref.norm(), b


def test_backend_overrides(monkeypatch):
    m = WinfT(windows=tiny_spec(), **TINY)
    x = torch.randn(1, 3, 32, 32)
    m(x)
    auto = m.attn_backends()[0]
    m.set_attn_backend('eager')
    m(x)
    assert m.attn_backends()[:2] == ['eager', 'eager']
    with vitfree.use_backend('dense'):  # the context beats the module setting
        m(x)
        assert m.attn_backends()[:2] == ['dense', 'dense']
    m(x)
    assert m.attn_backends()[0] == 'eager'
    m.set_attn_backend(None)
    monkeypatch.setenv('VITFREE_BACKEND', 'eager')
    m(x)
    assert m.attn_backends()[0] == 'eager'
    monkeypatch.setenv('VITFREE_BACKEND', 'fast')
    with pytest.raises(vitfree.BackendError, match=r"unknown attention backend 'fast' \(environment variable "
                                                   r"VITFREE_BACKEND\); choose one of \['auto', .*'dense'"):
        m(x)
    monkeypatch.delenv('VITFREE_BACKEND')
    with pytest.raises(vitfree.BackendError, match=r"unknown attention backend 'nope'"):
        with vitfree.use_backend('nope'):
            pass
    m(x)
    assert m.attn_backends()[0] == auto


def test_spec_resolution_forms(tmp_path):
    spec = tiny_spec()
    path = spec.save(tmp_path / 'spec.yaml')
    for form in (spec, spec.to_dict(), str(path), path):
        assert WinfT(windows=form, **TINY).window_spec == spec
    m = timm.create_model('winft_tiny_patch16_224', windows='winft_prior_d12_g14', img_size=64)
    assert m.window_spec.grid == (4, 4) and m.window_spec.provenance['resized_from'] == [14, 14]
    with pytest.raises(WindowSpecError, match='3 blocks but the model has depth 4'):
        WinfT(windows=spec, **dict(TINY, depth=4))
    with pytest.raises(WindowSpecError, match='per-head windows for 3 heads but the model has 4 heads'):
        WinfT(windows=tiny_spec(per_head=True), **dict(TINY, num_heads=4))


def test_create_winft_errors_and_names():
    with pytest.raises(ValueError, match=r"unknown timm model 'vit_nonexistent'"):
        create_winft('vit_nonexistent')
    with pytest.raises(ValueError, match=r'builds a VisionTransformerDistilled, which vitfree cannot give windows'):
        create_winft('deit_tiny_distilled_patch16_224')
    m = create_winft('winft_tiny_patch16_224', windows=WindowSpec.uniform(12, 4, 1), img_size=64)
    assert isinstance(m, WinfT) and m.window_spec.provenance['kind'] == 'uniform'


def test_create_winft_pretrained_loads_weights_strictly(tmp_path):
    """pretrained=True goes through timm's pretrained path (here a local safetensors file)."""
    from safetensors.torch import save_file
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=3)
    f = tmp_path / 'model.safetensors'
    save_file(vit.state_dict(), str(f))
    spec = WindowSpec.uniform(3, 4, 1)
    m = create_winft('vit_tiny_patch16_224', windows=spec, pretrained=True, img_size=64, depth=3,
                     pretrained_cfg_overlay=dict(file=str(f)))
    for k, t in vit.state_dict().items():
        assert torch.equal(m.state_dict()[k], t), k
    with vitfree.use_backend('eager'):
        y = m(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(y).all()


# ---- the timm model contract ---------------------------------------------------------------
@pytest.fixture
def model():
    return WinfT(windows=tiny_spec(), num_classes=7, **TINY)


def test_forward_features_head_and_classifier(model):
    x = torch.randn(2, 3, 32, 32)
    f = model.forward_features(x)
    assert f.shape == (2, 1 + 64, 48)
    assert model.forward_head(f).shape == (2, 7)
    assert model.forward_head(f, pre_logits=True).shape == (2, 48)
    model.reset_classifier(0)
    assert model(x).shape == (2, 48)
    model.reset_classifier(5, global_pool='avg')
    assert model(x).shape == (2, 5)
    assert model.get_classifier().out_features == 5
    assert torch.isfinite(model(x)).all()


def test_forward_intermediates_and_features_only(model):
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x, indices=[0, 2])
    assert [t.shape for t in inter] == [(2, 48, 8, 8)] * 2
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    f = timm.create_model('winft_tiny_patch16_224', img_size=64, features_only=True, out_indices=(1, -1))
    outs = f(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outs] == [(1, 192, 4, 4)] * 2
    assert f.feature_info.channels() == [192, 192]
    model.prune_intermediate_layers(indices=[1], prune_head=True)
    assert len(model.blocks) == 2


def test_backward_all_parameters_get_gradients(model):
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_grad_checkpointing_same_result(model):
    x = torch.randn(2, 3, 32, 32)
    y0 = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    y1 = model.eval()(x)
    model.train()
    y2 = model(x)
    y2.sum().backward()
    assert torch.allclose(y0, y1, atol=1e-6)
    assert all(p.grad is not None for p in model.parameters())


def test_dynamic_img_size_resizes_windows():
    spec = tiny_spec()
    m = WinfT(windows=spec, dynamic_img_size=True, **TINY).eval()
    y = m(torch.randn(1, 3, 48, 40))  # 12x10 grid
    assert y.shape == (1, 1000)
    lw = m.blocks[0].attn.windows_for(120)
    assert lw.grid == (12, 10)
    np.testing.assert_array_equal(lw.extents, spec.resize((12, 10)).blocks[0])
    # and back on the native grid: identical to a static model with the same weights
    s = WinfT(windows=spec, **TINY).eval()
    s.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert (m(x) - s(x)).abs().max() < 1e-5
    # dynamic padding for sizes that are not a multiple of the patch
    p = WinfT(windows=spec, dynamic_img_size=True, dynamic_img_pad=True, **TINY).eval()
    assert p(torch.randn(1, 3, 30, 37)).shape == (1, 1000)


def test_static_size_mismatch_is_an_error(model):
    with pytest.raises(AssertionError, match=r"Input height \(48\) doesn't match model \(32\)"):
        model(torch.randn(1, 3, 48, 48))


def test_set_input_size_resizes_spec(model):
    model.set_input_size(img_size=48)
    assert model.window_spec.grid == (12, 12)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 7)


def test_pretrained_cfg_and_default_cfgs():
    m = timm.create_model('winft_small_patch16_384', pretrained=False)
    cfg = m.pretrained_cfg
    assert cfg['input_size'] == (3, 384, 384) and cfg['hf_hub_id'] == 'timm/vit_small_patch16_384.augreg_in21k_ft_in1k'
    assert cfg['classifier'] == 'head' and cfg['first_conv'] == 'patch_embed.proj'
    assert m.window_spec.grid == (24, 24)
    m = timm.create_model('winft_small_patch16_224.fb_in1k', pretrained=False)
    assert m.pretrained_cfg['hf_hub_id'] == 'timm/deit_small_patch16_224.fb_in1k'
    dc = timm.data.resolve_data_config({}, model=m)
    assert dc['input_size'] == (3, 224, 224)


def test_in_chans_and_num_classes_args():
    m = WinfT(windows=tiny_spec(), in_chans=1, num_classes=3, **TINY)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_matches_eager_mode(model, backend):
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    compiled = torch.compile(model, backend=backend)
    assert (compiled(x) - ref).abs().max() < 1e-5


def test_torch_compile_dynamic_size():
    m = WinfT(windows=tiny_spec(), dynamic_img_size=True, **TINY).eval()
    c = torch.compile(m, backend='aot_eager')
    for size in ((32, 32), (40, 24)):
        x = torch.randn(1, 3, *size)
        assert (c(x) - m(x)).abs().max() < 1e-5


def test_window_resize_keep_through_timm_and_create_winft():
    import timm
    m = timm.create_model('winft_tiny_patch16_224', img_size=448, window_resize='keep', depth=2,
                          windows=vitfree.WindowSpec.uniform(2, 14, 2, global_blocks=[1]))
    assert m.window_spec.grid == (28, 28) and int(m.window_spec.blocks[0].max()) == 2
    s = timm.create_model('winft_tiny_patch16_224', img_size=448, depth=2,
                          windows=vitfree.WindowSpec.uniform(2, 14, 2, global_blocks=[1]))
    assert int(s.window_spec.blocks[0].max()) == 4  # scale: ceil(2 * 28 / 14)
    w = vitfree.create_winft('vit_tiny_patch16_224', windows=vitfree.WindowSpec.uniform(12, 14, 1), img_size=448,
                             window_resize='keep')
    assert int(w.window_spec.blocks[0].max()) == 1 and w._model_args['window_resize'] == 'keep'
    with pytest.raises(vitfree.WindowSpecError, match='resize mode'):
        vitfree.create_winft('vit_tiny_patch16_224', window_resize='stretch')


def test_window_resize_keep_with_dynamic_image_size():
    m = timm.create_model('winft_micro_patch2_28', dynamic_img_size=True, window_resize='keep',
                          windows=vitfree.WindowSpec.uniform(6, 14, 1)).eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 56, 42))
    lw = m.blocks[0].attn.windows_for(28 * 21)
    assert lw.grid == (28, 21) and int(lw.extents.max()) == 1


def test_model_level_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r'an image of \(7, 7\) px is smaller than one \(16, 16\) patch'):
        timm.create_model('winft_tiny_patch16_224', img_size=7)
    with pytest.raises(ValueError, match=r"WinfT: timm cannot build it with .*'num_heads': 5.*divisible by num_heads"):
        timm.create_model('winft_tiny_patch16_224', num_heads=5)
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224: timm cannot build it with .*'num_heads': 5"):
        create_winft('vit_tiny_patch16_224', num_heads=5)
