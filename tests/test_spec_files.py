"""Spec and file loading that cannot hang or mislead (issue 21, item 4): bounded sizes, strict
types with the offending path, decoding errors and weight-file problems that name the file."""
import json
import os
import time

import numpy as np
import pytest
import timm
from hypothesis import given, settings
from hypothesis import strategies as st

import vitfree  # noqa: F401  (registers the models)
from vitfree.hub import check_config, save_pretrained
from vitfree.weights import WeightsError, read_weights
from vitfree.windows import (MAX_DEPTH, MAX_GRID_SIDE, WindowSpec, WindowSpecError, resolve_spec, to_grid)

TINY = dict(img_size=32, patch_size=8, embed_dim=24, num_heads=2, depth=1, num_classes=3)


# ---- size limits before parsing ------------------------------------------------------------------
def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['format: vitfree.window_spec', 'version: 1', 'grid: [2, 2]', 'blocks: [global]',
             'provenance:', '  kind: uniform', '  a0: &a0 [x, x, x, x, x, x, x, x, x, x]']
    lines += [f'  a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, '
              f'*a{i - 1}, *a{i - 1}, *a{i - 1}]' for i in range(1, 10)]
    path = tmp_path / 'bomb.yaml'
    path.write_text('\n'.join(lines) + '\n')
    assert path.stat().st_size < 1200
    with pytest.raises(WindowSpecError, match=r'bomb.yaml: YAML alias \*a0 at line 8: .*may not use anchors and '
                                              r'aliases'):
        WindowSpec.load(path)
    with pytest.raises(WindowSpecError, match='bomb.yaml'):
        resolve_spec(str(path))


def test_oversized_spec_file_is_refused_before_parsing(tmp_path, monkeypatch):
    import vitfree.windows as windows
    path = tmp_path / 'big.json'
    path.write_text(json.dumps(WindowSpec.uniform(2, 3, 1).to_dict()) + ' ' * 2000)
    monkeypatch.setattr(windows, 'MAX_SPEC_BYTES', 1000)
    with pytest.raises(WindowSpecError, match=r'big.json has \d+ bytes, more than the 1000 allowed'):
        WindowSpec.load(path)


@pytest.mark.parametrize('grid', [[150000, 150000], [MAX_GRID_SIDE + 1, 2], 150000])
def test_huge_grid_in_a_config_fails_fast_with_the_limit(tmp_path, grid):
    model = timm.create_model('winft_tiny_patch16_224', windows=WindowSpec.uniform(1, 4, 1), **TINY)
    out = save_pretrained(model, tmp_path / 'export')
    cfg = json.loads((out / 'config.json').read_text())
    cfg['model_args']['windows']['grid'] = grid
    (out / 'config.json').write_text(json.dumps(cfg))
    start = time.process_time()
    with pytest.raises(WindowSpecError, match=rf'config.json: model_args.windows: grid .* too large: at most '
                                              rf'{MAX_GRID_SIDE} patches per side'):
        check_config(out / 'config.json')
    with pytest.raises(WindowSpecError, match=f'at most {MAX_GRID_SIDE} patches per side'):
        timm.create_model(f'local-dir:{out}')
    assert time.process_time() - start < 30  # no 84 GiB array was attempted (a MemoryError otherwise)


def test_depth_and_total_size_are_bounded():
    with pytest.raises(WindowSpecError, match=f'at most {MAX_DEPTH} blocks, got {MAX_DEPTH + 1}'):
        WindowSpec.from_dict({'format': 'vitfree.window_spec', 'version': 1, 'grid': [2, 2],
                              'blocks': ['global'] * (MAX_DEPTH + 1)})
    with pytest.raises(WindowSpecError, match='more than the 67108864 a window spec may hold'):
        WindowSpec.uniform(MAX_DEPTH, MAX_GRID_SIDE, 1)
    with pytest.raises(WindowSpecError, match=f'depth must be an integer in \\[1, {MAX_DEPTH}\\], got 5000'):
        WindowSpec.all_global(5000, 4)


# ---- strict types -----------------------------------------------------------------------------
@pytest.mark.parametrize('depth', [2.5, '2', None, True, 0])
def test_uniform_depth_must_be_an_integer(depth):
    with pytest.raises(WindowSpecError, match=f'depth must be an integer in \\[1, {MAX_DEPTH}\\], got {depth!r}'):
        WindowSpec.uniform(depth, 4, 1)


def test_radius_none_is_not_an_all_global_spec():
    with pytest.raises(WindowSpecError, match=r'radius must be an int .*got None; .*WindowSpec.all_global'):
        WindowSpec.uniform(2, 4, None)
    assert WindowSpec.all_global(2, 4).is_global(0)


@pytest.mark.parametrize('grid', ['44', (4.5, 4), [3.7, 4], True, (True, 4), (4, 4, 4), None, b'44'])
def test_grid_values_that_are_not_integers_are_refused(grid):
    with pytest.raises(WindowSpecError, match='grid must be an int or a pair of ints'):
        to_grid(grid)
    with pytest.raises(WindowSpecError, match='grid must be an int or a pair of ints'):
        WindowSpec.uniform(1, grid, 1)


def test_numpy_integers_are_accepted_everywhere():
    i = np.int64
    spec = WindowSpec.from_schedule((i(4), i(3)), [i(1), 'global', (i(0), i(1), i(2), i(1)), np.array([1, 1, 0, 0])])
    assert spec.grid == (4, 3) and spec.is_global(1) and np.all(spec.blocks[0] == 1)
    assert spec.provenance['schedule'] == [1, 'global', [0, 1, 2, 1], [1, 1, 0, 0]]
    assert json.loads(json.dumps(spec.to_dict()))  # the provenance is plain JSON
    same = WindowSpec.uniform(i(3), np.int32(4), i(2), global_blocks=[i(2)])
    assert same.depth == 3 and same.is_global(2) and WindowSpec.all_global(np.int16(2), 4).depth == 2
    assert to_grid(np.array([5, 6])) == (5, 6) and to_grid(i(7)) == (7, 7) and to_grid((4.0, 4)) == (4, 4)


def _file(tmp_path, d, name='spec.json'):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def _per_patch(h, w, value=1):
    return {side: [' '.join([str(value)] * w)] * h for side in ('up', 'down', 'left', 'right')}


@pytest.mark.parametrize('edit, where', [
    (lambda d: d['blocks'].__setitem__(0, [1, 1, 1.9, 1]), 'blocks[0]: expected [up, down, left, right] ints'),
    (lambda d: d['blocks'].__setitem__(0, True), "blocks[0]: expected 'global'"),
    (lambda d: d['blocks'].__setitem__(0, 1.0), "blocks[0]: expected 'global'"),
    (lambda d: d['blocks'][0]['left'].__setitem__(1, '1 1.9 1'), "blocks[0].left[1][1]: expected an integer, got '1.9'"),
    (lambda d: d['blocks'][0]['up'].__setitem__(2, [1, 1, True]), 'blocks[0].up[2][2]: expected an integer, got True'),
    (lambda d: d['blocks'][0]['down'].__setitem__(0, 'true 1 1'), "blocks[0].down[0][0]: expected an integer, got 'true'"),
    (lambda d: d.__setitem__('grid', [3.7, 3]), 'grid must be an int or a pair of ints (H, W), got [3.7, 3]'),
    (lambda d: d.__setitem__('grid', '33'), "grid must be an int or a pair of ints (H, W), got '33'"),
    (lambda d: d.__setitem__('grid', [True, 3]), 'grid must be an int or a pair of ints (H, W), got [True, 3]'),
    (lambda d: d.__setitem__('version', True), 'unknown version True'),
])
def test_file_values_of_the_wrong_type_name_their_path(tmp_path, edit, where):
    d = {'format': 'vitfree.window_spec', 'version': 1, 'grid': [3, 3], 'blocks': [_per_patch(3, 3)]}
    WindowSpec.from_dict(json.loads(json.dumps(d)))  # valid before the edit
    edit(d)
    path = _file(tmp_path, d)
    with pytest.raises(WindowSpecError) as info:
        WindowSpec.load(path)
    assert str(info.value).startswith(f'{path}: ') and where in str(info.value), str(info.value)


_bad_scalars = st.one_of(
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not float(v).is_integer()),
    st.text(max_size=3).filter(lambda t: not t.strip().lstrip('+-').isdigit() and not t.isspace() and t != ''),
    st.none())


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 4), w=st.integers(1, 4), side=st.sampled_from(['up', 'down', 'left', 'right']),
       r=st.integers(0, 3), c=st.integers(0, 3), bad=_bad_scalars, as_text=st.booleans())
def test_any_bad_value_in_a_per_patch_block_is_named_by_position(h, w, side, r, c, bad, as_text):
    r, c = r % h, c % w
    block = {s: [[1] * w for _ in range(h)] for s in ('up', 'down', 'left', 'right')}
    if as_text:  # rows as strings: the bad value is one token ('True', '1.5', 'nan', 'None', 'x1' ...)
        token = str(bad)
        block[side][r][c] = token if token.split() == [token] else 'x1'
        block[side] = [' '.join(str(v) for v in row) for row in block[side]]
    else:
        block[side][r][c] = bad
    d = {'format': 'vitfree.window_spec', 'version': 1, 'grid': [h, w], 'blocks': [block]}
    with pytest.raises(WindowSpecError, match=rf'^spec.json: blocks\[0\]\.{side}\[{r}\]\[{c}\]: expected an integer'):
        WindowSpec.from_dict(d, source='spec.json')


@settings(max_examples=60, deadline=None)
@given(value=st.one_of(st.booleans(), st.floats().filter(lambda v: not float(v).is_integer())),
       form=st.sampled_from(['scalar', 'list', 'array']))
def test_api_extents_refuse_booleans_and_fractions(value, form):
    radius = {'scalar': value, 'list': [1, value, 1, 1], 'array': np.array([1.0, float(value), 1.0, 1.0])}[form]
    if form == 'array' and isinstance(value, bool):
        radius = np.array([True, value, True, True])
    with pytest.raises(WindowSpecError, match='extents must be integers'):
        WindowSpec.uniform(1, 3, radius)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), depth=st.integers(1, 4), seed=st.integers(0, 2 ** 16),
       suffix=st.sampled_from(['.json', '.yaml']))
def test_valid_random_specs_round_trip_through_files(tmp_path_factory, h, w, depth, seed, suffix):
    rng = np.random.default_rng(seed)
    blocks = [None if rng.random() < 0.3 else rng.integers(0, 5, (h, w, 4)) for _ in range(depth)]
    spec = WindowSpec((h, w), blocks, {'kind': 'measured', 'seed': seed})
    path = spec.save(tmp_path_factory.mktemp('rt') / f'spec{suffix}')
    assert WindowSpec.load(path) == spec


# ---- decoding errors and broken files name the file -----------------------------------------------
@pytest.mark.parametrize('name', ['spec.yaml', 'spec.json'])
def test_non_utf8_spec_names_the_file_and_the_encoding(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'format: vitfree.window_spec\nversion: 1\ngrid: [2, 2]\nblocks: [\xe9t\xe9]\n')
    with pytest.raises(WindowSpecError, match=rf'{name} is not UTF-8 text: byte 0xe9 at offset 61'):
        WindowSpec.load(path)


def test_spec_path_that_is_a_folder_or_a_link_loop(tmp_path):
    (tmp_path / 'dir.yaml').mkdir()
    with pytest.raises(WindowSpecError, match='dir.yaml is a folder, not a file'):
        WindowSpec.load(tmp_path / 'dir.yaml')
    os.symlink('loop.yaml', tmp_path / 'loop.yaml')
    with pytest.raises(WindowSpecError, match='loop.yaml is a symlink loop'):
        resolve_spec(str(tmp_path / 'loop.yaml'))


@pytest.fixture(scope='module')
def export(tmp_path_factory):
    model = timm.create_model('winft_tiny_patch16_224', windows=WindowSpec.uniform(1, 4, 1), **TINY)
    return save_pretrained(model, tmp_path_factory.mktemp('export') / 'export')


def _copy(export, tmp_path):
    import shutil
    return shutil.copytree(export, tmp_path / 'copy')


def test_non_utf8_and_truncated_configs_name_the_file(export, tmp_path):
    out = _copy(export, tmp_path)
    text = (out / 'config.json').read_text()
    (out / 'config.json').write_bytes(text.encode().replace(b'"architecture"', b'"arch\xff"'))
    with pytest.raises(ValueError, match=r'copy/config.json is not UTF-8 text: byte 0xff'):
        check_config(out / 'config.json')
    with pytest.raises(WeightsError, match=r'copy/config.json is not UTF-8 text'):
        read_weights(out / 'model.safetensors')
    (out / 'config.json').write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=r'copy/config.json: not valid JSON .*truncated'):
        check_config(out / 'config.json')


@pytest.mark.parametrize('record', [True, False])
@pytest.mark.parametrize('make, what', [
    (lambda p: p.mkdir(), 'is a folder, not a file'),
    (lambda p: os.symlink(p.name, p), 'is a symlink loop'),
])
def test_weights_that_are_a_folder_or_a_link_loop_are_named(export, tmp_path, make, what, record):
    out = _copy(export, tmp_path)
    if not record:
        cfg = json.loads((out / 'config.json').read_text())
        cfg.pop('weights')
        (out / 'config.json').write_text(json.dumps(cfg))
    (out / 'model.safetensors').unlink()
    make(out / 'model.safetensors')
    with pytest.raises(WeightsError, match=f'copy/model.safetensors {what}'):
        timm.create_model(f'local-dir:{out}', pretrained=True)
    with pytest.raises(WeightsError, match='copy/model.safetensors'):
        read_weights(out / 'model.safetensors')
