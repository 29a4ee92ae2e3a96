"""WindowSpec: masks against a brute-force reading of METHODS §1.1-1.2, round trips, resize, errors."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vitfree.windows import LayerWindows, WindowSpec, WindowSpecError, get_spec, list_specs, resize_extents


def brute_mask(ext: np.ndarray, grid, prefix: int) -> np.ndarray:
    """Literal reading of §1.1-1.2, one pair at a time."""
    h, w = grid
    n = h * w
    t = prefix + n
    m = np.zeros((t, t), dtype=bool)
    m[:prefix, :] = True
    m[:, :prefix] = True
    for i in range(n):
        yi, xi = divmod(i, w)
        up, down, left, right = ext[yi, xi]
        for j in range(n):
            yj, xj = divmod(j, w)
            if -up <= yj - yi <= down and -left <= xj - xi <= right:
                m[prefix + i, prefix + j] = True
    return m


@st.composite
def grids_and_extents(draw, max_side=7, heads=None):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    shape = (h, w, 4) if heads is None else (heads, h, w, 4)
    seed = draw(st.integers(0, 2 ** 31 - 1))
    hi = draw(st.integers(0, max_side + 1))
    ext = np.random.default_rng(seed).integers(0, hi + 1, size=shape)
    return (h, w), ext


@settings(max_examples=60, deadline=None)
@given(grids_and_extents(), st.sampled_from([0, 1, 5]))
def test_mask_matches_brute_force(ge, prefix):
    grid, ext = ge
    spec = WindowSpec(grid, [ext], {'kind': 'uniform'})
    m = spec.mask(0, prefix).numpy()
    np.testing.assert_array_equal(m, brute_mask(ext, grid, prefix))
    assert m.any(axis=-1).all(), 'every query must have at least one key'
    assert np.diagonal(m).all(), 'every token sees itself'


@settings(max_examples=25, deadline=None)
@given(grids_and_extents(max_side=5, heads=3), st.sampled_from([0, 1]))
def test_per_head_mask(ge, prefix):
    grid, ext = ge
    spec = WindowSpec(grid, [ext, None], {'kind': 'measured'})
    m = spec.mask(0, prefix)
    assert m.shape == (3, prefix + grid[0] * grid[1], prefix + grid[0] * grid[1])
    for h in range(3):
        np.testing.assert_array_equal(m[h].numpy(), brute_mask(ext[h], grid, prefix))
    assert spec.mask(1, prefix).all()


def test_global_block_mask_is_full():
    spec = WindowSpec.uniform(3, (4, 5), 1, global_blocks=[1])
    assert spec.is_global(1) and not spec.is_global(0)
    assert spec.mask(1, 2).shape == (22, 22) and spec.mask(1, 2).all()
    assert not spec.mask(0, 2).all()


@settings(max_examples=30, deadline=None)
@given(grids_and_extents(max_side=9), st.booleans())
def test_yaml_json_round_trip_exact(tmp_path_factory, ge, per_head):
    grid, ext = ge
    blocks = [ext, None, np.stack([ext, ext[::-1, ::-1]]) if per_head else 2]
    prov = {'kind': 'measured', 'model': 'vit_x', 'tau': 0.9, 'images': 12, 'nested': {'a': [1, 2]}}
    spec = WindowSpec(grid, blocks, prov)
    d = tmp_path_factory.mktemp('rt')
    for suffix in ('.yaml', '.json'):
        back = WindowSpec.load(spec.save(d / f'spec{suffix}'))
        assert back == spec
        for a, b in zip(back.blocks, spec.blocks):
            assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
    assert WindowSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_file_is_compact_for_uniform_blocks(tmp_path):
    spec = WindowSpec.uniform(12, 24, 3, global_blocks=[10, 11])
    text = spec.save(tmp_path / 's.yaml').read_text()
    assert len(text.splitlines()) < 30


def test_resize_identity_and_rule():
    rng = np.random.default_rng(0)
    ext = rng.integers(0, 5, size=(14, 14, 4))
    spec = WindowSpec((14, 14), [ext, None], {'kind': 'measured'})
    assert spec.resize(14) is spec
    big = spec.resize((24, 21))
    assert big.grid == (24, 21) and big.blocks[1] is None
    assert big.provenance['resized_from'] == [14, 14]
    b = big.blocks[0]
    for yd in range(24):
        for xd in range(21):
            # nearest source patch by centres, extents scaled by the grid ratio and rounded up
            ys = min(int((yd + 0.5) * 14 / 24), 13)
            xs = min(int((xd + 0.5) * 14 / 21), 13)
            u, d, l, r = ext[ys, xs]
            assert tuple(b[yd, xd]) == (int(np.ceil(u * 24 / 14)), int(np.ceil(d * 24 / 14)),
                                        int(np.ceil(l * 21 / 14)), int(np.ceil(r * 21 / 14)))
    # shrinking rounds up too, so a window of radius 1 never collapses to 0
    small = resize_extents(np.ones((14, 14, 4), dtype=np.int32), (14, 14), (7, 7))
    assert small.min() == 1


def test_resize_per_head_keeps_heads():
    ext = np.random.default_rng(1).integers(0, 3, size=(2, 5, 6, 4))
    lw = LayerWindows(ext, (5, 6)).resize((10, 12))
    assert lw.extents.shape == (2, 10, 12, 4)
    np.testing.assert_array_equal(lw.extents[:, ::2, ::2], 2 * ext)


@pytest.mark.parametrize('bad, match', [
    (dict(grid=(3, 3), blocks=[np.full((3, 3, 4), -1)]), r'extents must be integers in \[0, 2\*\*31\), got -1'),
    (dict(grid=(3, 3), blocks=[np.zeros((3, 4, 4), int)]), r'shape \(H, W, 4\) = \(3, 3, 4\).*got \(3, 4, 4\)'),
    (dict(grid=(3, 3), blocks=['local']), r"expected 'global', 'partition\(s\)', 'partition\(sh, sw\)' or extents, got 'local'"),
    (dict(grid=(3, 3), blocks=[np.zeros((3, 3, 4)) + 0.5]), r'must be integers'),
    (dict(grid=(0, 3), blocks=[1]), r'grid must be positive'),
    (dict(grid=(3, 3), blocks=[]), r'must not be empty'),
    (dict(grid=(3, 3), blocks=[1], provenance={'kind': 'guess'}), r"provenance.kind must be one of .* got 'guess'"),
    (dict(grid=(3, 3), blocks=[np.zeros((2, 3, 3, 4), int), np.zeros((3, 3, 3, 4), int)]), r'disagree on the number of heads'),
])
def test_bad_specs_name_the_problem(bad, match):
    with pytest.raises(WindowSpecError, match=match):
        WindowSpec(**bad)


def test_bad_files_name_the_problem(tmp_path):
    good = WindowSpec.uniform(2, 4, 1).to_dict()
    cases = [
        (dict(good, version=99), r'unknown version 99'),
        (dict(good, format='other'), r"format must be 'vitfree.window_spec'"),
        ({k: v for k, v in good.items() if k != 'grid'}, r"missing field 'grid'"),
        (dict(good, blocks=[[1, 2, 3]]), r'blocks\[0\]: expected \[up, down, left, right\]'),
        (dict(good, blocks=[{'up': ['1 1 1 1'] * 3, 'down': [], 'left': [], 'right': []}]),
         r'blocks\[0\]\.up: expected 4 rows'),
        (dict(good, blocks=[{'up': ['1 1 1'] * 4, 'down': ['1 1 1 1'] * 4, 'left': ['1 1 1 1'] * 4,
                             'right': ['1 1 1 1'] * 4}]), r'blocks\[0\]\.up\[0\]: expected 4 values'),
        (dict(good, blocks=[[1, 1, -2, 1]]), r'extents must be integers in \[0, 2\*\*31\), got -2'),
    ]
    for i, (d, match) in enumerate(cases):
        p = tmp_path / f'bad{i}.json'
        p.write_text(json.dumps(d))
        with pytest.raises(WindowSpecError, match=match) as ei:
            WindowSpec.load(p)
        assert str(p) in str(ei.value)
    (tmp_path / 'broken.yaml').write_text('grid: [1, 2\nblocks: [')
    with pytest.raises(WindowSpecError, match='not valid YAML'):
        WindowSpec.load(tmp_path / 'broken.yaml')
    with pytest.raises(WindowSpecError, match='not found'):
        WindowSpec.load(tmp_path / 'nope.yaml')
    with pytest.raises(WindowSpecError, match=r"use a .yaml, .yml or .json suffix"):
        WindowSpec.uniform(1, 2, 0).save(tmp_path / 'x.txt')


def test_grid_mismatch_is_a_clear_error():
    spec = WindowSpec.uniform(12, 14, 2)
    with pytest.raises(WindowSpecError, match=r'14x14 patch grid but the model has 24x24; use spec.resize'):
        spec.check_compatible(12, 24)
    with pytest.raises(WindowSpecError, match=r'12 blocks but the model has depth 6'):
        spec.check_compatible(6, 14)


def test_shipped_priors_are_consistent():
    assert {'winft_prior_d12_g14', 'winft_prior_d12_g24'} <= set(list_specs())
    p14, p24 = get_spec('winft_prior_d12_g14'), get_spec('winft_prior_d12_g24')
    assert p14.provenance['kind'] == 'prior' and 'Not measured' in p14.provenance['reason']
    r = p14.resize(24)
    assert all(
        (a is None and b is None) or np.array_equal(a, b) for a, b in zip(r.blocks, p24.blocks))
    # windows widen with depth and the last blocks are global
    areas = [row['mean_area'] for row in p14.summary()]
    assert areas == sorted(areas) and p14.is_global(-1)
    with pytest.raises(WindowSpecError, match=r"unknown window spec 'nope'; shipped specs: .*winft_prior_d12_g14"):
        get_spec('nope')


def test_layer_windows_is_an_interned_value():
    lw = LayerWindows(np.ones((3, 3, 4), dtype=np.int32), (3, 3))
    assert LayerWindows(np.ones((3, 3, 4), dtype=np.int64), (3, 3)) is lw  # equal windows: one object
    assert not hasattr(lw, '_cache') and not hasattr(lw, 'cached')  # nothing derived is stored on it
    assert torch.equal(lw.mask(1), lw.mask(1)) and lw.mask(1) is not lw.mask(1)
    assert lw.mask(1).shape == (10, 10) and lw.mask(0).shape == (9, 9)
    assert lw.mean_area() == pytest.approx((4 + 6 + 4 + 6 + 9 + 6 + 4 + 6 + 4) / 9)
    assert torch.equal(lw.extents_tensor(), torch.ones(3, 3, 4, dtype=torch.int64))


# ---- resize modes (issue 13): 'scale' keeps a window's share of the image, 'keep' its size in patches
def test_resize_keep_keeps_extents_in_patches():
    spec = WindowSpec.uniform(3, 14, 3, global_blocks=[2])
    kept = spec.resize(64, mode='keep')
    assert kept.grid == (64, 64) and kept.is_global(2)
    assert np.all(kept.blocks[0] == 3) and kept.provenance['resize_mode'] == 'keep'
    scaled = spec.resize(64)
    assert np.all(scaled.blocks[0] == -(-3 * 64 // 14))  # ceil(3 * 64 / 14) = 14
    assert 'resize_mode' not in scaled.provenance


def test_resize_scale_keeps_whole_axis_windows_whole():
    spec = WindowSpec.uniform(1, 14, [13, 0, 2, 13])  # whole axis up and right
    e = spec.resize((64, 40)).blocks[0]
    assert np.all(e[..., 0] == 63) and np.all(e[..., 3] == 39)  # still the whole axis
    assert np.all(e[..., 1] == 0) and np.all(e[..., 2] == -(-2 * 40 // 14))
    assert np.all(spec.resize((64, 40), mode='keep').blocks[0] == [13, 0, 2, 13])


def test_resize_keep_to_a_smaller_grid_clips():
    spec = WindowSpec.uniform(1, 14, 6)
    assert np.all(spec.resize(4, mode='keep').blocks[0] == 3)


def test_resize_mode_is_checked():
    with pytest.raises(WindowSpecError, match="resize mode must be one of .*'scale', 'keep'.*got 'shrink'"):
        WindowSpec.uniform(1, 14, 3).resize(28, mode='shrink')


def test_extents_beyond_the_grid_are_clipped_and_huge_ones_refused():
    spec = WindowSpec.uniform(1, (5, 7), 100)
    assert spec.blocks[0].max() == 6 and spec.blocks[0][..., :2].max() == 4
    for bad in (2 ** 31, 2 ** 32, [2 ** 40, 1, 1, 1], 10 ** 30, -1):
        with pytest.raises(WindowSpecError, match=r'integers in \[0, 2\*\*31\), got ' + str(np.ravel(bad)[0])):
            WindowSpec.uniform(1, 7, bad)
