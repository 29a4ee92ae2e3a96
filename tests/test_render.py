"""Pictures: every plot writes a readable PNG; the flow colour code means what it says."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vitfree
from vitfree.analysis import plots as render
from vitfree.analysis.removal import RemovalResult

TINY = dict(img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=5)


@pytest.fixture(scope='module')
def measured():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    return model, x, vitfree.measure_erf(model, x, tau=0.5, gamma=0.9, progress=False, return_result=True)


def assert_png(path, min_side=200):
    with Image.open(path) as im:
        assert im.format == 'PNG'
        assert min(im.size) >= min_side
        arr = np.asarray(im.convert('L'))
    assert arr.std() > 5  # not a blank canvas


def test_erf_pictures(measured, tmp_path):
    model, x, res = measured
    files = render.erf_pictures(res, tmp_path, image=x[0], model=model)
    assert set(files) == {'window_sizes', 'erf_rects', 'tendency_arrows', 'tendency_flow', 'interaction_matrices',
                          'interaction_maps'}
    for p in files.values():
        assert p.parent == tmp_path
        assert_png(p)


def test_single_plots_and_options(measured, tmp_path):
    model, x, res = measured
    img = Image.open('vitfree/assets/chelsea.jpg')
    assert_png(render.plot_interaction(img, res.interaction, (4, 4), tmp_path / 'a.png', patches=[0, (3, 2)],
                                       blocks=[1]))
    assert_png(render.plot_erf_rects(res, tmp_path / 'b.png', blocks=[0], patches=[(1, 1)]))
    assert_png(render.plot_window_sizes(res.spec, tmp_path / 'c.png'))
    with pytest.raises(ValueError, match=r'patch \(4, 0\) outside the 4x4 grid'):
        render.plot_interaction(img, res.interaction, (4, 4), tmp_path / 'd.png', patches=[(4, 0)])
    with pytest.raises(ValueError, match='expected \\(9, 9\\) for grid 3x3'):
        render.plot_interaction(img, res.interaction, (3, 3), tmp_path / 'e.png')


def test_removal_curves(tmp_path):
    res = RemovalResult(fractions=[0, 0.5, 0.9], removed=[0, 8, 14],
                        accuracy={'interaction': [0.9, 0.8, 0.5], 'random': [0.9, 0.6, 0.2]}, num_images=10,
                        grid=(4, 4))
    assert_png(render.plot_removal(res, tmp_path / 'removal.png'))


def test_recorder_save(tmp_path):
    model = timm.create_model('vit_tiny_patch16_224', **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), vitfree.record(model) as rec:
        model(x)
    paths = rec.save(tmp_path, image=x[0])
    assert [p.name for p in paths] == ['interaction_matrices.png', 'interaction_maps.png']
    for p in paths:
        assert_png(p)


def test_flow_colours():
    vec = np.array([[0.0, 0.0], [0.0, 2.0], [0.0, -2.0], [-2.0, 0.0], [0.0, 0.5]])  # (dy, dx)
    c = render.flow_colors(vec)
    np.testing.assert_allclose(c[0], [1, 1, 1])          # no tendency: white
    np.testing.assert_allclose(c[1], [1, 0, 0])          # right, full length: red
    np.testing.assert_allclose(c[2], [0, 1, 1])          # left: the opposite hue (cyan)
    np.testing.assert_allclose(c[3], [0.5, 1, 0])        # up (dy < 0): a quarter turn counter-clockwise
    assert 0 < (1 - c[4][1]) < 1                          # shorter: paler, same hue
    assert np.allclose(render.flow_colors(np.zeros((2, 2))), 1)


def test_block_and_patch_pickers():
    assert render.pick_blocks(range(12), 6) == [0, 2, 4, 7, 9, 11]
    assert render.pick_blocks([3, 4], 6) == [3, 4]
    assert render.default_patches((1, 1)) == [(0, 0)]
    assert len(render.default_patches((14, 14))) == 4


def test_self_only_block_draws_no_tendency_and_keeps_the_scale(tmp_path, monkeypatch):
    """A block whose every ERF is the patch itself (e.g. the last block under the attribution
    estimator: its patch outputs never reach the logit) has no measured tendency: no arrows, and
    it does not set the arrow scale shared with the other blocks."""
    from vitfree.analysis import erf_from_interaction
    n = 25
    near = torch.zeros(n, n)
    for i in range(n):  # block 0: each patch interacts with itself and its right neighbour
        near[i, i] = 0.5
        near[i, i - 1 if i % 5 == 4 else i + 1] = 0.5
    res = erf_from_interaction({0: near, 1: torch.eye(n)}, grid=(5, 5), tau=0.9, gamma=2.0)
    assert render._self_only(res, 1) and not render._self_only(res, 0)
    fields, top = render._fields_and_top(res, [0, 1], None)
    assert top == pytest.approx(float(np.hypot(fields[0][..., 0], fields[0][..., 1]).max()))
    assert top < float(np.hypot(fields[1][..., 0], fields[1][..., 1]).max())  # the self-only block would dominate
    quivers = []
    import matplotlib.axes
    orig = matplotlib.axes.Axes.quiver
    monkeypatch.setattr(matplotlib.axes.Axes, 'quiver', lambda self, *a, **k: quivers.append(a) or orig(self, *a, **k))
    assert_png(render.plot_tendency_arrows(res, tmp_path / 'arrows.png'))
    assert len(quivers) == 1  # block 0 only
    assert_png(render.plot_tendency_flow(res, tmp_path / 'flow.png'))
