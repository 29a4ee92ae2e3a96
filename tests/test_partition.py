"""Partition windows (METHODS §1.6): each patch's window is the cell of an ``sh x sw`` tiling from the
top-left corner that holds it, clipped to the grid; a per-patch rectangle like any other window, which
stays a partition through files, resizing and per-head blocks."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitfree import WindowSpec
from vitfree.windows import WindowSpecError, partition_cell, partition_extents


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), sh=st.integers(1, 14), sw=st.integers(1, 14))
def test_partition_mask_is_same_cell(h, w, sh, sw):
    """Patch j is in patch i's window exactly when both lie in the same cell (as SAM's window_partition
    groups them after padding the grid to a multiple of the cell)."""
    spec = WindowSpec((h, w), [f'partition({sh}, {sw})'])
    ys, xs = np.divmod(np.arange(h * w), w)
    cell = (ys // sh) * 100000 + xs // sw
    want = torch.from_numpy(cell[:, None] == cell[None, :])
    assert torch.equal(spec.mask(0), want)
    assert partition_cell(spec.blocks[0], (h, w)) is not None


def test_partition_round_trips_and_resizes(tmp_path):
    heads = np.stack([partition_extents((9, 7), 3), np.broadcast_to(np.array([0, 1, 0, 1]), (9, 7, 4))])
    spec = WindowSpec.from_schedule((9, 7), ['partition(3)', 'global', 'partition(2, 4)', 1, heads])
    d = spec.to_dict()
    assert d['blocks'][:4] == ['partition(3)', 'global', 'partition(2, 4)', [1, 1, 1, 1]]
    assert d['blocks'][4] == {'heads': ['partition(3)', [0, 1, 0, 1]]}
    for suffix in ('yaml', 'json'):
        back = WindowSpec.load(spec.save(tmp_path / f's.{suffix}'))
        assert back.same_windows(spec)
    scaled = spec.resize((18, 14))
    assert scaled.to_dict()['blocks'][0] == 'partition(6)' and scaled.to_dict()['blocks'][2] == 'partition(4, 8)'
    kept = spec.resize((18, 14), 'keep')
    assert kept.to_dict()['blocks'][0] == 'partition(3)'
    assert np.array_equal(kept.blocks[0], partition_extents((18, 14), 3))


@pytest.mark.parametrize('bad', ['partition(0)', 'partition(3, 0)', 'partition()', 'partition(2, 3, 4)', 'part(3)'])
def test_bad_partition_entries_are_named(bad):
    with pytest.raises(WindowSpecError, match=r"blocks\[0\]"):
        WindowSpec((4, 4), [bad])
