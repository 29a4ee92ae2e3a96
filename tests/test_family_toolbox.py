"""The timm toolbox on the WinfT of every family (per-head windows and a global block), each run side by side
with timm's own model of the family: what timm's model passes, the WinfT passes with its own eager result;
what timm's model fails, the WinfT fails with the same error (ONNX export of the Eva family, whose
attention passes a tensor ``is_causal`` to SDPA in the legacy exporter)."""
import io
import warnings

import pytest
import torch
from families import FAMILIES, images, kwargs_of, random_spec, timm_model, winft_of

import vitfree

pytestmark = pytest.mark.usefixtures('one_thread')

TOOLBOX = ['eva02', 'dinov3', 'pe', 'sam', 'beit']


def _pair(name):
    return timm_model(name), winft_of(name, windows=random_spec(name, global_blocks=(1,)))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize('name', TOOLBOX)
def test_torchscript(name):
    x = images(name, batch=1)
    for m in _pair(name):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            s = torch.jit.script(m)
        with torch.no_grad():
            _close(s(x), m(x))


@pytest.mark.parametrize('name', TOOLBOX)
def test_fx_feature_extraction(name):
    """timm's FX feature extraction (the dispatched kernel is one leaf) gives the blocks' own outputs."""
    from timm.models import FeatureGraphNet
    x = images(name, batch=1)
    for m in _pair(name):
        store = {}
        hooks = [m.blocks[i].register_forward_hook(lambda mod, a, out, i=i: store.__setitem__(i, out))
                 for i in (0, 1)]
        with torch.no_grad():
            m(x)
        for h in hooks:
            h.remove()
        f = FeatureGraphNet(m, out_indices=(0, 1)).eval()
        with torch.no_grad():
            feats = f(x)
        for got, i in zip(feats, (0, 1)):
            _close(got, store[i])


@pytest.mark.parametrize('name', ['eva02', 'sam', 'beit'])
def test_compile_fullgraph_and_export(name):
    x = images(name, batch=1)
    for m in _pair(name):
        with torch.no_grad():
            want = m(x)
            _close(torch.compile(m, fullgraph=True)(x), want)
            _close(torch.export.export(m, (x,)).module()(x), want)
        torch._dynamo.reset()


@pytest.mark.parametrize('name', TOOLBOX)
def test_onnx_export(name):
    """ONNX (legacy exporter, run in onnxruntime) where timm's model exports; the same error where it does not."""
    ort = pytest.importorskip('onnxruntime')
    x = images(name, batch=1)
    results = []
    for m in _pair(name):
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                torch.onnx.export(m, (x,), buf, dynamo=False)
        except Exception as e:  # noqa: BLE001 - compared below
            results.append((type(e), str(e).split('\n')[0]))
            continue
        sess = ort.InferenceSession(buf.getvalue())
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-4)
        results.append('ok')
    assert results[0] == results[1]
    if name in ('sam', 'beit'):
        assert results == ['ok', 'ok']


@pytest.mark.parametrize('name', TOOLBOX)
def test_features_only_and_intermediates(name):
    spec = random_spec(name, global_blocks=(1,))
    m = winft_of(name, windows=spec)
    x = images(name, batch=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        f = vitfree.create_winft(FAMILIES[name][0], windows=spec, features_only=True, out_indices=(0, 2)
                                 if len(m.blocks) > 2 else (0, 1), **kwargs_of(name)).eval()
    inner = f.model if hasattr(f, 'model') else f  # timm's feature wrapper holds the (pruned) model
    missing, _ = inner.load_state_dict(m.state_dict(), strict=False)
    assert not missing and vitfree.is_winft(inner) and inner.window_spec.same_windows(spec)
    idx = [0, 2] if len(m.blocks) > 2 else [0, 1]
    with torch.no_grad():
        feats = f(x)
        inter = m.forward_intermediates(x, indices=idx, intermediates_only=True)
    assert len(feats) == len(inter) == 2
    for a, b in zip(feats, inter):
        _close(a, b)
