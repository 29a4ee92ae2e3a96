"""Pictures: every plot writes a readable PNG, and says what the tables say (trivial blocks, merged modes)."""
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
    assert set(files) == {'window_sizes', 'erf_rects', 'tendency', 'interaction_matrices', 'interaction_maps'}
    assert 'window_sizes' not in render.erf_pictures(res, tmp_path / 'again', window_sizes=False)
    for p in files.values():
        assert p.parent == tmp_path
        assert_png(p)


def test_single_plots_and_options(measured, tmp_path):
    model, x, res = measured
    img = Image.open('vitfree/assets/chelsea.jpg')
    assert_png(render.plot_interaction(img, res.interaction, (4, 4), tmp_path / 'a.png', patches=[0, (3, 2)],
                                       blocks=[1]))
    assert_png(render.plot_erf_rects(res, tmp_path / 'b.png', blocks=[0], patches=[(1, 1)]))
    with pytest.raises(ValueError, match='at most 4 patches per ERF panel'):
        render.plot_erf_rects(res, tmp_path / 'b.png', patches=[(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)])
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


def test_block_and_patch_pickers():
    assert render.pick_blocks(range(12), 6) == [0, 2, 4, 7, 9, 11]
    assert render.pick_blocks([3, 4], 6) == [3, 4]
    assert render.default_patches((1, 1)) == [(0, 0)]
    assert len(render.default_patches((14, 14))) == 4


def test_trivial_block_draws_no_tendency_and_keeps_the_scale(tmp_path, monkeypatch):
    """A block whose every patch interacts only with itself (1x1 windows, or the last block under
    the attribution estimator: its patch outputs never reach the logit) has no measured tendency:
    no arrows, it does not set the scale shared with the other blocks, and the table says trivial
    (no |t - u|) as the picture does."""
    from vitfree.analysis import erf_from_interaction
    n = 25
    near = torch.zeros(n, n)
    for i in range(n):  # block 0: each patch interacts with itself and its right neighbour
        near[i, i] = 0.5
        near[i, i - 1 if i % 5 == 4 else i + 1] = 0.5
    res = erf_from_interaction({0: near, 1: torch.eye(n)}, grid=(5, 5), tau=0.9, gamma=2.0)
    assert res.trivial_blocks == [1] and render._trivial(res, 1) and not render._trivial(res, 0)
    fields, top = render._fields_and_top(res, [0, 1], None)
    assert top == pytest.approx(float(np.hypot(fields[0][..., 0], fields[0][..., 1]).max()))
    assert top < float(np.hypot(fields[1][..., 0], fields[1][..., 1]).max())  # the trivial block would dominate
    row = res.summary()[1]
    assert row['trivial'] and np.isnan(row['mean_excess_tendency']) and row['mean_tendency'] == 0
    assert res.summary_rows()[1][-2:] == ('-', 'local, trivial')
    assert 'trivial' in res.format_summary() and 'trivial: [1]' in repr(res)
    quivers = []
    import matplotlib.axes
    orig = matplotlib.axes.Axes.quiver
    monkeypatch.setattr(matplotlib.axes.Axes, 'quiver', lambda self, *a, **k: quivers.append(a) or orig(self, *a, **k))
    assert_png(render.plot_tendency(res, tmp_path / 'tendency.png'))
    assert len(quivers) == 1  # block 0 only


def test_identical_head_modes_share_one_panel(tmp_path):
    """Modes with the same results (here, without prefix tokens, 1, 3, 5 and 6 zero nothing and 2 equals 4) are
    drawn once, titled with every mode they stand for."""
    from vitfree.analysis.heads import head_importance
    model = timm.create_model('vit_tiny_patch16_224', class_token=False, global_pool='avg', **TINY).eval()
    imp = head_importance(model, torch.randn(2, 3, 64, 64), progress=False, gate=False)
    groups = imp.mode_groups()
    assert groups == [[1, 3, 5, 6], [2, 4]]  # and the whole head is the patch block (mode 4)
    titles = []
    import matplotlib.axes
    orig = matplotlib.axes.Axes.set_title
    try:
        matplotlib.axes.Axes.set_title = lambda self, t, *a, **k: titles.append(t) or orig(self, t, *a, **k)
        assert_png(render.plot_head_importance(imp, tmp_path / 'heads.png'))
    finally:
        matplotlib.axes.Axes.set_title = orig
    assert 'modes 1, 3, 5, 6:\nnone, prefix, prefix-patch, prefix-prefix (no effect)' in titles
    assert len([t for t in titles if t.startswith('mode')]) == len(groups)
    assert 'modes [1, 2, 3, 4, 5, 6]' in repr(imp) and 'array' not in repr(imp)
