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
    timm.layers.set_fused_attn(False)
    try:
        m = _make(name)
    finally:
        timm.layers.set_fused_attn(True)
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
