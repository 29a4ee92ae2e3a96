"""ERF growth on synthetic rows, tendency, the gamma rule, and measured specs that build WinfTs."""
import numpy as np
import pytest
import timm
import torch

import vitfree
from vitfree.analysis.erf import erf_from_interaction, erf_rectangles, tendency_vectors, uniform_tendency
from vitfree.windows import WindowSpec, window_mask

TINY = dict(img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=5)


def rect_rows(grid, rects, inside, outside=0.0, rng=None):
    """Rows (N, N) with mass ``inside`` spread over each patch's rectangle and ``outside`` over the
    rest (uniform, or random positive weights inside when ``rng`` is given)."""
    h, w = grid
    n = h * w
    ext = np.asarray(rects).reshape(h, w, 4)
    mask = window_mask(ext).numpy()
    rows = np.zeros((n, n))
    for i in range(n):
        wts = rng.uniform(0.1, 1.0, n) if rng is not None else np.ones(n)
        ins = np.where(mask[i], wts, 0)
        rows[i] = inside * ins / ins.sum()
        if outside:
            rows[i] += np.where(mask[i], 0, outside / max(1, n - mask[i].sum()))
    return rows


def clip_rects(grid, rects):
    h, w = grid
    ys, xs = np.mgrid[0:h, 0:w]
    r = np.asarray(rects).reshape(h, w, 4).copy()
    r[..., 0] = np.minimum(r[..., 0], ys)
    r[..., 1] = np.minimum(r[..., 1], h - 1 - ys)
    r[..., 2] = np.minimum(r[..., 2], xs)
    r[..., 3] = np.minimum(r[..., 3], w - 1 - xs)
    return r


@pytest.mark.parametrize('grid', [(5, 5), (4, 7), (1, 6)])
def test_synthetic_rectangles_are_recovered(grid):
    rng = np.random.default_rng(0)
    for trial in range(3):
        rects = rng.integers(0, 4, size=(*grid, 4))
        want = clip_rects(grid, rects)
        # 95% of the mass spread evenly in the rectangle, 5% over the rest: tau just below 0.95
        got, mass = erf_rectangles(rect_rows(grid, rects, 0.95, 0.05), grid, tau=0.94)
        np.testing.assert_array_equal(got.reshape(*grid, 4), want)
        assert np.all(mass >= 0.94)
        # random positive weights inside, nothing outside: tau = 1 finds exactly the support
        got, mass = erf_rectangles(rect_rows(grid, rects, 1.0, rng=rng), grid, tau=1.0)
        np.testing.assert_array_equal(got.reshape(*grid, 4), want)
        np.testing.assert_allclose(mass, 1.0)


def test_tau_one_gives_the_full_grid_for_positive_rows():
    grid = (4, 6)
    rng = np.random.default_rng(1)
    rows = rng.uniform(1e-6, 1, size=(3, 24, 24))
    rows /= rows.sum(-1, keepdims=True)
    rects, mass = erf_rectangles(rows, grid, tau=1.0)
    assert rects.shape == (3, 24, 4)
    full = clip_rects(grid, np.full((*grid, 4), 99)).reshape(24, 4)
    assert np.all(rects == full)
    np.testing.assert_allclose(mass, 1.0)


def test_growth_is_deterministic_with_documented_tie_breaking():
    grid = (5, 5)
    uniform = np.full((25, 25), 1 / 25)
    # all strips tie: half-plane mass, then smaller extent, then up/down/left/right -> centred 3x3
    rects, mass = erf_rectangles(uniform, grid, tau=9 / 25)
    assert tuple(rects[12]) == (1, 1, 1, 1) and mass[12] == pytest.approx(9 / 25)
    # a corner patch can only grow inwards, evenly
    assert tuple(rects[0]) == (0, 2, 0, 2)
    rng = np.random.default_rng(2)
    rows = rng.dirichlet(np.ones(25), size=25)
    a = erf_rectangles(rows, grid, tau=0.7)
    b = erf_rectangles(torch.tensor(rows), grid, tau=0.7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_growth_follows_mass_around_corners_without_leaving_its_support():
    # all mass on the diagonal neighbour: no strip next to the patch holds any, the half-plane
    # rule must still go the right way (down, then right) and never up or left
    grid = (3, 3)
    rows = np.zeros((9, 9))
    rows[:, :] = np.eye(9)
    rows[4] = 0
    rows[4, 8] = 1.0  # patch (1, 1) interacts only with (2, 2)
    rects, mass = erf_rectangles(rows, grid, tau=0.5)
    assert tuple(rects[4]) == (0, 1, 0, 1) and mass[4] == 1.0
    assert np.all(rects[[0, 1, 2, 3, 5, 6, 7, 8]] == 0)


def test_tendency_vectors():
    grid = (3, 4)
    rows = np.zeros((12, 12))
    rows[:, 11] = 1.0  # everyone looks at the bottom-right patch (2, 3)
    t = tendency_vectors(rows, grid)
    ys, xs = np.divmod(np.arange(12), 4)
    np.testing.assert_allclose(t[:, 0], 2 - ys)
    np.testing.assert_allclose(t[:, 1], 3 - xs)
    sym = np.full((12, 12), 1 / 12)
    assert np.abs(tendency_vectors(sym, grid)[5]).max() < 1.0  # a central patch barely leans


def test_gamma_rule_and_result():
    grid = (4, 4)
    uniform = torch.full((16, 16), 1 / 16)
    local = torch.eye(16)
    res = erf_from_interaction({0: local, 1: uniform}, grid, tau=0.9, gamma=0.6)
    assert res.global_blocks == [1]
    assert res.spec.blocks[1] is None and res.spec.blocks[0].shape == (4, 4, 4)
    assert np.all(res.spec.blocks[0] == 0)
    assert res.blocks[0].mean_area == 1.0 and res.blocks[1].mean_area == 16.0
    assert res[1].tendency.shape == (4, 4, 2) and res[1].mass.shape == (4, 4)
    assert 'global' in res.format_summary()
    never = erf_from_interaction({0: local, 1: uniform}, grid, gamma=1.5)
    assert never.global_blocks == []
    with pytest.raises(ValueError, match='every block 0..L-1'):
        erf_from_interaction({1: uniform}, grid)
    with pytest.raises(ValueError, match=r'tau must be in \(0, 1\]'):
        erf_rectangles(uniform, grid, tau=0.0)
    with pytest.raises(ValueError, match='gamma must be >= 0'):
        erf_from_interaction({0: uniform}, grid, gamma=-1)
    with pytest.raises(ValueError, match='N = 4x4 = 16'):
        erf_rectangles(torch.ones(9, 9), grid)


@pytest.mark.parametrize('tau', [0.5, 0.9, 1.0])
def test_winft_erfs_stay_inside_its_windows(tau):
    rng = np.random.default_rng(3)
    grid = (4, 4)
    spec = WindowSpec(grid, [rng.integers(0, 3, size=(*grid, 4)), rng.integers(0, 2, size=(*grid, 4))],
                      {'kind': 'prior'})
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, **TINY).eval()
    res = vitfree.measure_erf(model, torch.randn(3, 3, 64, 64), tau=tau, gamma=2.0, progress=False,
                              return_result=True)
    for b in range(2):
        win = clip_rects(grid, spec.blocks[b])
        assert np.all(res.blocks[b].rects <= win), b
        if tau == 1.0:  # softmax is positive on the whole window, so all of it is needed
            np.testing.assert_array_equal(res.blocks[b].rects, win)


def test_measure_erf_closes_the_loop(tmp_path):
    vit = timm.create_model('vit_tiny_patch16_224', **TINY).eval()
    x = torch.randn(4, 3, 64, 64)
    spec = vitfree.measure_erf(vit, x, tau=0.5, gamma=0.9, progress=False, checkpoint='random init')
    prov = spec.provenance
    assert prov['kind'] == 'measured' and prov['model'].startswith('vit_tiny_patch16_224')
    assert prov['checkpoint'] == 'random init' and prov['num_images'] == 4 and prov['estimator'] == 'attention'
    assert prov['tau'] == 0.5 and prov['gamma'] == 0.9 and 'tensor batch' in prov['data']
    assert spec.grid == (4, 4) and spec.depth == 2 and not all(b is None for b in spec.blocks)
    again = vitfree.measure_erf(vit, x, tau=0.5, gamma=0.9, progress=False, checkpoint='random init')
    assert again == spec  # deterministic
    path = spec.save(tmp_path / 'spec.yaml')
    loaded = WindowSpec.load(path)
    assert loaded == spec
    winft = vitfree.create_winft('vit_tiny_patch16_224', windows=loaded, **TINY).eval()
    winft.load_state_dict(vit.state_dict(), strict=True)
    assert winft.window_spec == spec
    with torch.no_grad():
        out = winft(x)
    assert out.shape == (4, 5) and torch.isfinite(out).all()


def test_measure_erf_per_head_and_other_estimators():
    vit = timm.create_model('vit_tiny_patch16_224', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    res = vitfree.measure_erf(vit, x, tau=0.5, gamma=2.0, per_head=True, progress=False, return_result=True)
    assert res.spec.blocks[0].shape == (2, 4, 4, 4) and res.spec.provenance['per_head'] is True
    winft = vitfree.create_winft('vit_tiny_patch16_224', windows=res.spec, **TINY)
    assert winft(x).shape == (2, 5)
    spec = vitfree.measure_erf(vit, x, 'attribution', progress=False)
    assert spec.provenance['estimator'] == 'attribution' and spec.provenance['target'] == 'predicted'


# ---- excess tendency (METHODS 3.2): what the model learned, not the geometry -------------------
def test_uniform_interaction_has_no_excess_tendency():
    grid = (5, 7)
    n = 35
    res = erf_from_interaction({0: torch.full((n, n), 1 / n)}, grid, gamma=2.0)
    b = res[0]
    assert np.abs(b.tendency).max() > 1.0  # raw tendency: the border pulls towards the centre
    np.testing.assert_allclose(b.excess_tendency, 0, atol=1e-6)  # float32 maps
    # uniform over each patch's window (clipped at the border) against those windows
    rng = np.random.default_rng(0)
    ext = rng.integers(0, 3, size=(*grid, 4))
    mask = window_mask(ext).numpy().astype(np.float64)
    rows = mask / mask.sum(1, keepdims=True)
    res = erf_from_interaction({0: rows, 1: rows}, grid, gamma=2.0, windows=[ext, None])
    np.testing.assert_allclose(res[0].excess_tendency, 0, atol=1e-12)
    assert np.abs(res[1].excess_tendency).max() > 0.5  # measured against the whole grid it is not zero
    row = res.summary()[0]
    assert row['mean_excess_tendency'] == pytest.approx(0, abs=1e-12) and row['mean_tendency'] > 0


def test_look_left_interaction_gives_the_expected_excess():
    """Every patch draws only on its left neighbour (the left column on itself): t = (0, -1) off the
    left column, 0 on it; u is the pull of the whole 3x4 grid towards its centre (1, 1.5)."""
    grid = (3, 4)
    rows = np.zeros((12, 12))
    for i in range(12):
        y, x = divmod(i, 4)
        rows[i, y * 4 + max(x - 1, 0)] = 1.0
    b = erf_from_interaction({0: rows}, grid, gamma=2.0)[0]
    ys, xs = np.mgrid[0:3, 0:4]
    t = np.stack([np.zeros((3, 4)), -(xs > 0).astype(float)], -1)
    u = np.stack([1.0 - ys, 1.5 - xs], -1)
    np.testing.assert_allclose(b.tendency, t)
    np.testing.assert_allclose(b.uniform, u)
    np.testing.assert_allclose(b.excess_tendency, t - u)
    np.testing.assert_allclose(b.excess_tendency[1, 1], [0.0, -1.5])  # left of centre: learned pull exceeds geometry
    # inside 1x3 windows (one patch left and right) the geometry pulls nowhere except at the border
    ext = np.zeros((3, 4, 4), dtype=int)
    ext[..., 2:] = 1
    bw = erf_from_interaction({0: rows}, grid, gamma=2.0, windows=[ext])[0]
    u_win = np.stack([np.zeros((3, 4)), np.where(xs == 0, 0.5, np.where(xs == 3, -0.5, 0.0))], -1)
    np.testing.assert_allclose(bw.uniform, u_win)
    np.testing.assert_allclose(bw.excess_tendency, t - u_win)


def test_uniform_tendency_per_head_and_errors():
    ext = np.zeros((2, 3, 3, 4), dtype=int)
    ext[1] = 2  # head 1: windows covering the whole 3x3 grid
    u = uniform_tendency((3, 3), ext)
    assert u.shape == (2, 3, 3, 2)
    np.testing.assert_allclose(u[0], 0)
    np.testing.assert_allclose(u[1], uniform_tendency((3, 3)))
    with pytest.raises(ValueError, match=r'\(\.\.\., 3, 3, 4\)'):
        uniform_tendency((3, 3), np.zeros((2, 2, 4)))


def test_measure_erf_uses_the_models_windows_for_the_baseline():
    spec = WindowSpec((4, 4), [np.full((4, 4, 4), 1), None], {'kind': 'uniform'})
    model = vitfree.create_winft('vit_tiny_patch16_224', windows=spec, **TINY).eval()
    res = vitfree.measure_erf(model, torch.randn(2, 3, 64, 64), tau=0.9, gamma=2.0, progress=False,
                              return_result=True)
    np.testing.assert_array_equal(res[0].window, spec.blocks[0])
    np.testing.assert_allclose(res[0].uniform, uniform_tendency((4, 4), spec.blocks[0]))
    assert res[1].window is None
    np.testing.assert_allclose(res[1].uniform, uniform_tendency((4, 4)))


def test_area_table_text_and_markdown():
    grid = (4, 4)
    res = erf_from_interaction({0: torch.eye(16), 1: torch.full((16, 16), 1 / 16)}, grid, tau=0.9, gamma=0.6)
    rows = res.summary()
    assert [r['global'] for r in rows] == [False, True]
    assert rows[0]['min_area'] == rows[0]['max_area'] == 1 and rows[1]['mean_area'] == 16
    assert rows[1]['fraction'] == 1.0
    text = res.format_summary()
    assert 'mean ERF area' in text and 'global' in text and '|t - u|' in text
    md = res.format_summary('markdown').splitlines()
    assert md[0].startswith('| block | mean ERF area | min | max | of grid |') and set(md[1]) <= set('|-: ')
    assert md[3].startswith('| 1 | 16.0 | 16 | 16 | 100.0% |')
    with pytest.raises(ValueError, match='table style'):
        res.format_summary('latex')


def test_provenance_names_checkpoints_and_data_without_machine_paths(tmp_path, monkeypatch):
    from pathlib import Path

    from vitfree.analysis.erf import checkpoint_hint
    from vitfree.weights import portable_path, portable_text
    monkeypatch.chdir(tmp_path)
    maps = {0: torch.full((4, 4), 0.25), 1: torch.eye(4)}
    res = erf_from_interaction(maps, grid=(2, 2), provenance={
        'checkpoint': f'{tmp_path}/runs/vit/model (seed 0)', 'data': 'image files under /srv/data/photos'})
    assert res.spec.provenance['checkpoint'] == 'runs/vit/model (seed 0)'  # relative to the current folder
    assert res.spec.provenance['data'] == 'image files under data/photos'   # elsewhere: its last two parts
    assert portable_path('weights/x.safetensors') == 'weights/x.safetensors'  # relative paths stay as given
    root = Path(vitfree.__file__).resolve().parent.parent
    assert portable_path(root / 'weights' / 'x.safetensors') == str(Path('weights') / 'x.safetensors')
    assert portable_text('see https://huggingface.co/timm/x and /a/b/c') == 'see https://huggingface.co/timm/x and b/c'
    shipped = timm.create_model('vit_micro_patch2_28.fmnist', pretrained=True)
    assert checkpoint_hint(shipped) == 'vit_micro_patch2_28.fmnist (weights/vit_micro_patch2_28.fmnist.safetensors)'
    assert checkpoint_hint(timm.create_model('vit_tiny_patch16_224', **TINY)).startswith('hf-hub:timm/')


def test_measure_erf_warns_when_every_block_comes_out_global():
    vit = timm.create_model('vit_tiny_patch16_224', **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match=r'every block came out global: .*gamma=0.01 of the 4x4 grid '
                                         r'\(0.2 of 16 patches; the smallest is [\d.]+ at tau=0.9\)'):
        spec = vitfree.measure_erf(vit, x, gamma=0.01, progress=False)
    assert all(b is None for b in spec.blocks)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # windows found: no warning
        spec = vitfree.measure_erf(vit, x, tau=0.3, gamma=2.0, progress=False)
    assert not all(b is None for b in spec.blocks)


def readme_block(heading: str) -> str:
    """The first ```python block under ``heading`` in the README, as it is written there."""
    import re
    from pathlib import Path
    text = (Path(vitfree.__file__).resolve().parent.parent / 'README.md').read_text()
    section = text[text.index(heading):]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_readme_measuring_example_runs_as_written(tmp_path, monkeypatch, one_thread):
    code = readme_block('## Measuring windows: recorder, interaction maps, ERFs')
    monkeypatch.chdir(tmp_path)  # the block writes spec.yaml
    import warnings
    ns = {}
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)  # no "every block came out global"
        exec(compile(code, 'README.md', 'exec'), ns)
    assert ns['rec'].attention[-1].shape == (8, 4, 197, 197) and ns['res'][3].shape == (196, 196)
    spec = ns['spec']
    assert not any(spec.is_global(b) for b in range(spec.depth))  # it measures windows, as the README says
    assert all(0.51 <= a['fraction'] <= 0.61 for a in spec.summary()), spec.summary()  # as the README says
    assert WindowSpec.load(tmp_path / 'spec.yaml') == spec and ns['winft'].window_spec == spec
    assert spec.provenance['checkpoint'] == 'vit_micro_patch2_28.fmnist (weights/vit_micro_patch2_28.fmnist.safetensors)'
    # and the README's other setting indeed gives no window, with the warning it promises
    with pytest.warns(UserWarning, match='every block came out global'):
        vitfree.measure_erf(ns['vit'], ns['images'], estimator='attention', tau=0.9, gamma=0.6, progress=False)
