"""The timm toolbox on WinfT, side by side with a plain timm ViT of the same shape.

Every item that works on timm's ``VisionTransformer`` must work on WinfT (uniform, per-head and
measured windows, ``create_winft`` models and ``dynamic_img_size``) and give the model's own
eager result: TorchScript, FX (timm's ``feature_cls='fx'`` and torchvision's feature
extraction), ``torch.compile(fullgraph=True)``, compile then ``torch.inference_mode``,
``torch.export``, ONNX export (run with onnxruntime), ``features_only`` /
``forward_intermediates``, and timm's ``AttentionExtract`` on every block.
"""
import contextlib
import io
import warnings

import numpy as np
import pytest
import timm
import torch

import vitfree
from vitfree import WindowSpec

pytestmark = pytest.mark.usefixtures('one_thread')

X = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def _per_head_spec():
    ext = np.random.default_rng(0).integers(0, 4, size=(4, 14, 14, 4))
    return WindowSpec((14, 14), [ext, 'global', ext, 2, 'global', [1, 2, 0, 3]], {'kind': 'uniform', 'radius': 'mixed'})


MODELS = {
    'vit': lambda **kw: timm.create_model('vit_micro_patch2_28', **kw),
    'winft_measured': lambda **kw: timm.create_model('winft_micro_patch2_28', **kw),
    'winft_uniform': lambda **kw: timm.create_model('winft_micro_patch2_28', windows=WindowSpec.uniform(6, 14, 2),
                                                    **kw),
    'winft_per_head': lambda **kw: vitfree.create_winft('vit_micro_patch2_28', windows=_per_head_spec(), **kw),
    'winft_dynamic': lambda **kw: timm.create_model('winft_micro_patch2_28', dynamic_img_size=True, **kw),
}
NAMES = list(MODELS)


def _make(name, **kw):
    torch.manual_seed(0)  # the same weights for every form of one model
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return MODELS[name](**kw).eval()


def _make_unfused(name):
    """``_make(name)`` built while timm's fused attention is off (its layers take the explicit softmax)."""
    timm.layers.set_fused_attn(False)
    try:
        return _make(name)
    finally:
        timm.layers.set_fused_attn(True)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize('name', NAMES)
def test_torchscript(name):
    m = _make(name)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        s = torch.jit.script(m)
    with torch.no_grad():
        _close(s(X), m(X))
    buf = io.BytesIO()
    torch.jit.save(s, buf)  # a scripted model can be saved and loaded without Python
    buf.seek(0)
    with torch.no_grad():
        _close(torch.jit.load(buf)(X), m(X))


@pytest.mark.parametrize('name', NAMES)
def test_fx_feature_extraction(name):
    from timm.models import get_graph_node_names
    from torchvision.models.feature_extraction import get_graph_node_names as tv_names
    m = _make(name)
    train, evl = get_graph_node_names(m)
    assert any(n.startswith('blocks.5') for n in evl)
    f = _make(name, features_only=True, feature_cls='fx', out_indices=(1, 3, 5))
    feats = f(X)  # block outputs (B, T, C) with the class token
    ref = m.forward_intermediates(X, indices=(1, 3, 5), intermediates_only=True)  # (B, C, H, W)
    assert len(feats) == 3
    for a, b in zip(feats, ref):
        _close(a[:, 1:].transpose(1, 2).reshape(b.shape), b)
    if name != 'winft_dynamic' and name != 'vit':  # torchvision's tracer fails on timm's own dynamic-size ViT
        tv_names(m)


def test_torchvision_fx_on_plain_vit_and_winft():
    from torchvision.models.feature_extraction import create_feature_extractor
    for name in ('vit', 'winft_measured'):
        m = _make(name)
        fx = create_feature_extractor(m, return_nodes={'blocks.3': 'b3', 'head': 'logits'})
        with torch.no_grad():
            _close(fx(X)['logits'], m(X))


@pytest.mark.parametrize('name', NAMES)
def test_compile_fullgraph_and_inference_mode(name):
    m = _make(name)
    c = torch.compile(m, fullgraph=True, backend='aot_eager')
    with torch.no_grad():
        _close(c(X), m(X))
    with torch.inference_mode():
        _close(c(X), m(X))


def test_compile_dynamic_size_follows_the_grid():
    m = _make('winft_dynamic')
    c = torch.compile(m, backend='aot_eager')
    x = torch.randn(1, 3, 36, 28)
    with torch.no_grad():
        _close(c(x), m(x))
        _close(c(X), m(X))


@pytest.mark.parametrize('name', NAMES)
def test_torch_export(name):
    m = _make(name)
    ep = torch.export.export(m, (X,))
    with torch.no_grad():
        _close(ep.module()(X), m(X))


@pytest.mark.parametrize('name', ['vit', 'winft_measured', 'winft_per_head'])
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    m = _make(name)
    path = tmp_path / 'm.onnx'
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')
        torch.onnx.export(m, (X,), str(path), dynamo=True)
    sess = ort.InferenceSession(str(path))
    out = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})[0]
    with torch.no_grad():
        _close(torch.from_numpy(out), m(X), tol=1e-4)


@pytest.mark.parametrize('name', NAMES)
def test_features_only_and_intermediates(name):
    m = _make(name)
    f = _make(name, features_only=True, out_indices=(2, 5))
    feats = f(X)
    assert [t.shape for t in feats] == [(2, 64, 14, 14)] * 2
    _close(feats[1], m.forward_intermediates(X, indices=(5,), intermediates_only=True)[0])


@pytest.mark.parametrize('name', NAMES)
def test_attention_extract_sees_every_block(name):
    from timm.utils import AttentionExtract
    m = _make_unfused(name)
    out = AttentionExtract(m, method='hook')(X)
    assert len(out) == len(m.blocks) == 6
    for i, (key, a) in enumerate(out.items()):
        assert key == f'blocks.{i}.attn.attn_drop' and a.shape == (2, 4, 197, 197)
        _close(a.sum(-1), torch.ones(2, 4, 197))
        if hasattr(m, 'window_spec'):
            allowed = m.window_spec.mask(i, num_prefix_tokens=1)
            assert torch.all(a[..., ~allowed] == 0)


def test_attention_extract_under_eager_backend_without_global_switch():
    """``vitfree.use_backend('eager')`` alone sends windowed blocks through the hook point."""
    from timm.utils import AttentionExtract
    m = _make('winft_measured')
    ex = AttentionExtract(m, method='hook')
    with vitfree.use_backend('eager'):
        out = ex(X)
    windowed = [i for i in range(6) if not m.window_spec.is_global(i)]
    assert [f'blocks.{i}.attn.attn_drop' for i in windowed] == [k for k in out if int(k.split('.')[1]) in windowed]


@pytest.mark.parametrize('name', NAMES)
def test_fx_graph_is_bit_exact_with_the_module(name):
    """timm's FX graph of a WinfT calls the very kernel the module runs (one leaf per windowed layer), so
    the two agree bit for bit, as timm's own test_model_forward_fx asks."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    m = _make(name)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    last = get_graph_node_names(m, tracer_kwargs=tracer_kwargs)[1][-1]
    fx_model = create_feature_extractor(m, return_nodes=[last], tracer_kwargs=tracer_kwargs)
    with torch.inference_mode():
        out, ref = fx_model(X)[last], m(X)
    assert torch.equal(out, ref)


def test_attention_extract_hook_with_fused_attention_on_plain_vit_gets_nothing():
    from timm.utils import AttentionExtract
    assert AttentionExtract(_make('vit'), method='hook')(X) == {}  # timm's own ViT: fused attention skips attn_drop


@pytest.mark.parametrize('name', [n for n in NAMES if n != 'vit'])
def test_attention_extract_hook_with_fused_attention_on(name):
    """With fused attention on, a hook on attn_drop sends the layer through the explicit softmax, so
    AttentionExtract(method='hook') captures every block (timm's own ViT returns {} there)."""
    from timm.utils import AttentionExtract
    m = _make(name)
    assert all(b.attn.fused_attn for b in m.blocks)
    with torch.no_grad():
        ref = m(X)
    ex = AttentionExtract(m, method='hook')
    out = ex(X)
    assert list(out) == [f'blocks.{i}.attn.attn_drop' for i in range(6)]
    for a in out.values():
        _close(a.sum(-1), torch.ones(2, 4, 197))
    with torch.no_grad():
        _close(ex.model(X), ref)  # the hooked forward computes the same output


@pytest.mark.parametrize('name', ['winft_measured', 'winft_per_head'])
def test_attention_extract_fx_with_fused_attention_off(name):
    from timm.utils import AttentionExtract
    m = _make_unfused(name)
    hooked = AttentionExtract(m, method='hook')(X)
    traced = AttentionExtract(m, method='fx')(X)
    assert list(traced) == [f'blocks.{i}.attn.softmax' for i in range(6)]
    for a, b in zip(traced.values(), hooked.values()):
        _close(a, b)


@pytest.mark.parametrize('maker', ['registered', 'create_winft'])
def test_timm_save_for_hf_round_trip(maker, tmp_path):
    """timm's own export writes the windows into config.json and safetensors; local-dir: rebuilds it."""
    import json

    from timm.models import save_for_hf
    spec = WindowSpec.uniform(6, 14, 2, global_blocks=[5])
    if maker == 'registered':
        m = _make('winft_uniform')
        m.set_window_spec(spec)
    else:
        m = vitfree.create_winft('vit_micro_patch2_28', windows=spec).eval()
    save_for_hf(m, str(tmp_path), safe_serialization=True)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert (tmp_path / 'model.safetensors').is_file() and not (tmp_path / 'pytorch_model.bin').exists()
    assert cfg['architecture'] == ('winft_micro_patch2_28' if maker == 'registered' else 'vitfree_winft')
    r = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert r.window_spec.same_windows(spec)
    with torch.no_grad():
        assert torch.equal(r(X), m(X))
