"""Checkpoint format: lossless round trip, atomic writes, corruption detected, fallback, keep-last."""
import json
import random

import numpy as np
import pytest
import torch

from vitfree.train.checkpoint import (CheckpointError, CheckpointManager, decode_state, encode_state,
                                      load_checkpoint, rng_state, save_checkpoint, set_rng_state)


def _optimizer_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_keeps_every_value_and_type(tmp_path):
    model, opt = _optimizer_state()
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'rng': rng_state(),
             'misc': {'tuple': (1, 2.5, None), 'nested': [{'a': np.arange(3, dtype=np.uint32)}], 'bf16':
                      torch.ones(2, dtype=torch.bfloat16), 'inf': float('inf')}}
    path = save_checkpoint(state, tmp_path / 'ckpt-000000001')
    back = load_checkpoint(path)
    assert sorted(p.name for p in path.iterdir()) == ['state.json', 'state.safetensors']
    for k, v in state['model'].items():
        assert torch.equal(back['model'][k], v)
    assert set(back['optimizer']['state']) == {0, 1, 2, 3}  # int keys survive
    assert back['optimizer']['param_groups'] == opt.state_dict()['param_groups']
    assert torch.equal(back['optimizer']['state'][0]['exp_avg'], opt.state_dict()['state'][0]['exp_avg'])
    assert back['misc']['tuple'] == (1, 2.5, None) and back['misc']['inf'] == float('inf')
    arr = back['misc']['nested'][0]['a']
    assert arr.dtype == np.uint32 and arr.tolist() == [0, 1, 2]
    assert back['misc']['bf16'].dtype == torch.bfloat16
    # the optimizer loads it back and continues identically
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(back['optimizer'])
    assert opt2.state_dict()['state'][1]['step'] == opt.state_dict()['state'][1]['step']


def test_rng_state_restores_all_generators():
    state = decode_state(*reversed(encode_state(rng_state())))  # through the file format's encoding
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_unsupported_value_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot store object at 'state/odd'"):
        save_checkpoint({'odd': object()}, tmp_path / 'ckpt-000000001')


@pytest.mark.parametrize('damage, match', [
    (lambda p: (p / 'state.safetensors').write_bytes((p / 'state.safetensors').read_bytes()[:-10]), 'truncated'),
    (lambda p: (p / 'state.safetensors').write_bytes(b'\0' * (p / 'state.safetensors').stat().st_size),
     'SHA-256'),
    (lambda p: (p / 'state.json').write_text('{"format": "vitfree.checkpoint", "vers'), 'not valid JSON'),
    (lambda p: (p / 'state.json').unlink(), 'state.json is missing'),
    (lambda p: (p / 'state.safetensors').unlink(), 'state.safetensors is missing'),
])
def test_damaged_checkpoint_gives_clear_error(tmp_path, damage, match):
    path = save_checkpoint({'w': torch.randn(64)}, tmp_path / 'ckpt-000000001')
    damage(path)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_manager_keeps_last_and_falls_back(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        mgr.save({'step': step, 'w': torch.full((3,), float(step))}, step)
    mgr.save({'step': 6, 'end': True}, 6, epoch_end=True)
    assert [p.name for p in mgr.list()] == ['ckpt-000000006', 'ckpt-000000006-end']
    (tmp_path / '.tmp-ckpt-000000008-123').mkdir()  # a crash mid-write leaves this: ignored and cleaned
    (tmp_path / 'ckpt-000000006-end' / 'state.json').write_text('garbage')
    with caplog.at_level('WARNING'):
        path, state = mgr.load_latest()
    assert path.name == 'ckpt-000000006' and state['step'] == 6
    assert 'ckpt-000000006-end is corrupt' in caplog.text
    mgr.clean_temporary()
    assert not (tmp_path / '.tmp-ckpt-000000008-123').exists()
    (tmp_path / 'ckpt-000000006' / 'state.safetensors').write_bytes(b'')
    with pytest.raises(CheckpointError, match='no valid checkpoint'):
        mgr.load_latest()
    assert CheckpointManager(tmp_path / 'empty').load_latest() is None


def test_index_records_hash_and_size(tmp_path):
    path = save_checkpoint({'w': torch.zeros(5)}, tmp_path / 'ckpt-000000003')
    index = json.loads((path / 'state.json').read_text())
    assert index['format'] == 'vitfree.checkpoint' and len(index['tensors']['sha256']) == 64
    assert index['tensors']['size'] == (path / 'state.safetensors').stat().st_size
    assert index['state'] == {'w': {'__tensor__': 'state/w'}}
