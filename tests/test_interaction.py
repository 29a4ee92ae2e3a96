"""Interaction maps: the three estimators, their agreement on a WinfT, image inputs."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vitfree
from vitfree.analysis.inputs import ImageFiles, iter_images, model_transform
from vitfree.analysis.interaction import row_normalize

TINY = dict(img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=5)
ASSETS = ['vitfree/assets/coffee.jpg', 'vitfree/assets/chelsea.jpg']


def tiny_vit(**kw):
    return timm.create_model('vit_tiny_patch16_224', **dict(TINY, **kw)).eval()


def random_windows(grid, depth, seed=0):
    rng = np.random.default_rng(seed)
    return vitfree.WindowSpec(grid, [rng.integers(0, 3, size=(*grid, 4)) for _ in range(depth)], {'kind': 'prior'})


@pytest.fixture(scope='module')
def winft():
    torch.manual_seed(0)
    spec = random_windows((4, 4), 2)
    return vitfree.create_winft('vit_tiny_patch16_224', windows=spec, **TINY).eval()


@pytest.fixture(scope='module')
def maps(winft):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    return {e: vitfree.interaction(winft, x, e, progress=False, ablation_batch=9) for e in vitfree.analysis.ESTIMATORS}


def test_maps_are_row_normalised_and_non_negative(maps):
    for est, res in maps.items():
        assert res.estimator == est and res.num_images == 3 and res.grid == (4, 4) and res.blocks == [0, 1]
        for b in res.blocks:
            m = res[b]
            assert m.shape == (16, 16) and m.dtype == torch.float32
            assert torch.all(m >= 0)
            torch.testing.assert_close(m.sum(-1), torch.ones(16), rtol=0, atol=1e-5)


def test_estimators_agree_on_window_structure(winft, maps):
    """In every block of a WinfT, no estimator finds interaction outside a patch's window:
    attention and attribution are zero there because A is, ablation because removing a key the
    query never sees changes nothing - exactly, not just approximately."""
    for b in range(2):
        outside = ~winft.window_spec.mask(b)
        for est, res in maps.items():
            assert torch.all(res[b][outside] == 0), (est, b)
        # attention sees every patch of the window (softmax is positive) ...
        assert torch.all(maps['attention'][b][~outside] > 0)
    # ... and ablation finds the first block's interactions in the windows too: for a random
    # model the two estimators still rank keys alike on average
    a, c = maps['attention'][0], maps['ablation'][0]
    inside = winft.window_spec.mask(0)
    rho = np.corrcoef(a[inside].numpy(), c[inside].numpy())[0, 1]
    assert rho > 0


def test_blocks_subset_per_head_and_errors():
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    res = vitfree.interaction(model, x, 'attention', blocks=[1], per_head=True, progress=False)
    assert res.blocks == [1] and res[1].shape == (2, 16, 16)
    torch.testing.assert_close(res[1].sum(-1), torch.ones(2, 16))
    with pytest.raises(KeyError, match='block 0 was not measured'):
        res[0]
    with pytest.raises(ValueError, match="unknown interaction estimator 'gradcam'"):
        vitfree.interaction(model, x, 'gradcam', progress=False)
    with pytest.raises(ValueError, match="target='label' needs labelled images"):
        vitfree.interaction(model, x, 'attribution', target='label', progress=False)
    with pytest.raises(ValueError, match='per_head=True is not defined'):
        vitfree.interaction(model, x, 'ablation', per_head=True, progress=False)


def test_attribution_targets_and_labels():
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    pred = model(x).argmax(1)
    a = vitfree.interaction(model, (x, pred), 'attribution', target='label', progress=False)
    b = vitfree.interaction(model, x, 'attribution', target='predicted', progress=False)
    for blk in a.blocks:
        torch.testing.assert_close(a[blk], b[blk])
    c = vitfree.interaction(model, x, 'attribution', target=int((pred[0] + 1) % 5), progress=False)
    assert a.target == 'label' and c.target == str(int((pred[0] + 1) % 5))
    assert not torch.allclose(c[0], a[0])


def test_model_state_restored():
    model = tiny_vit()
    model.train()
    model.blocks[0].training = False  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    fused = [b.attn.fused_attn for b in model.blocks]
    vitfree.interaction(model, torch.randn(1, 3, 64, 64), 'ablation', progress=False)
    assert [m.training for m in model.modules()] == flags
    assert [b.attn.fused_attn for b in model.blocks] == fused
    assert not any('forward' in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_image_sources_give_the_same_maps(tmp_path):
    model = tiny_vit(reg_tokens=2)
    tf = model_transform(model)
    x = torch.stack([tf(Image.open(p).convert('RGB')) for p in ASSETS])
    assert x.shape == (2, 3, 64, 64)
    ref = vitfree.interaction(model, x, progress=False)
    (tmp_path / 'a').mkdir()
    for i, p in enumerate(ASSETS):
        Image.open(p).save(tmp_path / 'a' / f'{i}.png')
    sources = {
        'paths': ASSETS,
        'pil list': [Image.open(p) for p in ASSETS],
        'folder': str(tmp_path),
        'dataset': ImageFiles(ASSETS),
        'loader': torch.utils.data.DataLoader(list(zip(x, [0, 1])), batch_size=1),
    }
    for name, src in sources.items():
        res = vitfree.interaction(model, src, progress=False, batch_size=1)
        assert res.num_images == 2, name
        for b in ref.blocks:
            torch.testing.assert_close(res[b], ref[b], rtol=1e-4, atol=1e-6, msg=name)
    one = vitfree.interaction(model, ASSETS, num_images=1, progress=False)
    assert one.num_images == 1
    assert 'ImageFiles' in sources['dataset'].__repr__()


def test_iter_images_batches_labels_and_limits():
    model = tiny_vit()
    x, y = torch.randn(5, 3, 64, 64), torch.arange(5)
    batches = list(iter_images(model, (x, y), batch_size=2, num_images=3))
    assert [b[0].shape[0] for b in batches] == [2, 1]
    assert torch.equal(torch.cat([b[1] for b in batches]), y[:3])
    assert list(iter_images(model, x[0], batch_size=4))[0][0].shape == (1, 3, 64, 64)
    with pytest.raises(TypeError, match='images must be a tensor'):
        list(iter_images(model, 42))
    with pytest.raises(ValueError, match='num_images must be >= 1'):
        list(iter_images(model, x, num_images=0))


def test_mixed_grids_are_refused_with_dynamic_size():
    model = tiny_vit(dynamic_img_size=True)
    loader = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 96, 64)]
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(1, 3, 64, 64)), batch_size=1)
    assert vitfree.interaction(model, dl, progress=False).grid == (4, 4)
    with pytest.raises(ValueError, match='same patch grid'):
        vitfree.interaction(model, [t[0] for t in loader], batch_size=1, progress=False)
    with pytest.raises(ValueError, match='different sizes cannot share a batch'):
        vitfree.interaction(model, [t[0] for t in loader], batch_size=2, progress=False)


def test_row_normalize_zero_rows_become_self_mass():
    m = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    torch.testing.assert_close(row_normalize(m), torch.tensor([[1.0, 0.0], [0.25, 0.75]]))
