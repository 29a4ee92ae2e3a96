"""No state leaks between calls: whatever a backend prepared (biases, bounds, tile plans) was made
outside every autograd, inference and autocast mode, so any call order works on every backend:
inference, no_grad, training, bf16 autocast, a second model with equal windows, another thread, and
eager code after a compiled step.  Outputs are checked against a float64 reference each time."""
import itertools
import threading

import numpy as np
import pytest
import torch

import vitfree
from vitfree import WindowSpec, WinfT

pytestmark = pytest.mark.usefixtures('one_thread')

CPU_BACKENDS = ['dense', 'tiled', 'native', 'eager', 'sdpa-tiles', 'auto']
TINY = dict(img_size=(20, 24), patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=3)


def _spec(seed=0):
    rng = np.random.default_rng(seed)
    return WindowSpec((5, 6), [rng.integers(0, 3, size=(2, 5, 6, 4)), rng.integers(0, 2, size=(5, 6, 4))],
                      {'kind': 'uniform'})


def _model(backend, seed=0):
    torch.manual_seed(seed)
    return WinfT(windows=_spec(), attn_backend=None if backend == 'auto' else backend, **TINY)


X = torch.randn(2, 3, 20, 24, generator=torch.Generator().manual_seed(3))


def _reference(model):
    """The same weights in float64 on the eager path: the exact result of every step."""
    ref = WinfT(windows=_spec(), attn_backend='eager', **TINY).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return ref.eval()(X.double()).detach()


def _close(out, ref, lowp=False):
    tol = (0.05 if lowp else 1e-4) * ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol, (out, ref)


def _step_inference(m):
    with torch.inference_mode():
        return m.eval()(X)


def _step_no_grad(m):
    with torch.no_grad():
        return m.eval()(X)


def _step_train(m):
    m.train()
    y = m(X)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.zero_grad()
    return y.detach()


def _step_autocast(m):
    m.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(X)
    y.float().square().sum().backward()
    m.zero_grad()
    return y.detach()


def _step_second_model(m):
    other = _model(m.attn_backend, seed=0)  # equal windows: the same interned LayerWindows
    other.load_state_dict(m.state_dict())
    return _step_train(other)


def _step_thread(m):
    box = {}

    def work():
        try:
            box['out'] = _step_train(m)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box['error'] = e
    t = threading.Thread(target=work)
    t.start()
    t.join()
    if 'error' in box:
        raise box['error']
    return box['out']


STEPS = {'inference': _step_inference, 'no_grad': _step_no_grad, 'train': _step_train, 'autocast': _step_autocast,
         'second_model': _step_second_model, 'thread': _step_thread}


@pytest.mark.parametrize('order', list(itertools.permutations(STEPS, 2)), ids='-then-'.join)
@pytest.mark.parametrize('backend', CPU_BACKENDS)
def test_every_order_of_two_modes(backend, order):
    vitfree.ops.clear_prepared()  # every case starts with nothing prepared
    m = _model(backend)
    ref = _reference(m)
    for name in order:
        out = STEPS[name](m)
        _close(out, ref, lowp=name == 'autocast')


def test_evaluate_then_train_the_shipped_model():
    """The case from the issue: inference with the shipped WinfT, then training the same model."""
    import timm
    m = timm.create_model('winft_micro_patch2_28.fmnist', pretrained=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.inference_mode():
        m.eval()(x)
    m.train()(x).sum().backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize('backend', ['dense', 'tiled', 'native', 'eager'])
def test_compile_then_eager_then_inference(backend):
    m = _model(backend)
    ref = _reference(m)
    compiled = torch.compile(m, backend='aot_eager')
    m.train()
    y = compiled(X)
    y.square().sum().backward()
    _close(y.detach(), ref)
    for step in ('train', 'inference', 'autocast', 'train'):
        _close(STEPS[step](m), ref, lowp=step == 'autocast')


def test_prepared_tensors_are_plain_tensors():
    """What a plan holds is neither an inference tensor nor part of an autograd graph, whatever mode
    the first caller was in."""
    from vitfree.ops import make_query, plan
    from vitfree.windows import LayerWindows
    w = LayerWindows(np.random.default_rng(5).integers(0, 3, size=(7, 5, 4)), (7, 5))
    q = torch.randn(1, 2, 1 + 35, 8, requires_grad=True)
    for backend in ('dense', 'eager', 'native', 'tiled', 'sdpa-tiles'):
        with torch.inference_mode():
            p = plan(w, make_query(q, w.grid, 1, 2, 8, override=backend))
        tensors = [t for t in (p.data if isinstance(p.data, tuple) else (p.data,)) if torch.is_tensor(t)]
        for field in (p.data if isinstance(p.data, tuple) else (p.data,)):
            tensors += [v for v in vars(field).values() if torch.is_tensor(v)] if hasattr(field, '__dict__') else []
        assert tensors, backend
        for t in tensors:
            assert not t.is_inference() and not t.requires_grad and t.grad_fn is None, backend
